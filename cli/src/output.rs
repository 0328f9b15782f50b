//! How the CLI speaks: text for people or `--json` for scripts, and one line
//! per error with an exit code that tells the gRPC status apart.

use storegate::pb::product::v1::Product;
use tonic::Code;

pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints `value` as JSON, or `text` for people.
    pub fn print(&self, value: serde_json::Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{}", text());
        }
    }
}

pub fn product_json(p: &Product) -> serde_json::Value {
    let time = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.to_string());
    serde_json::json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "price": p.price,
        "stock": p.stock,
        "etag": p.etag,
        "create_time": time(&p.create_time),
        "update_time": time(&p.update_time),
        "created_by": p.created_by,
        "updated_by": p.updated_by,
    })
}

pub fn product_line(p: &Product) -> String {
    format!("{:>6}  {:<40} {:>14}  stock {:<8} etag {}", p.id, p.name, p.price, p.stock, p.etag)
}

/// Exit codes: 1 for local problems, 10 + the gRPC code for a refusal by a
/// server (e.g. 15 NOT_FOUND, 26 UNAUTHENTICATED).
pub fn report_error(err: &anyhow::Error) -> i32 {
    if let Some(status) = err.downcast_ref::<tonic::Status>() {
        let code = status.code();
        let what = match code {
            Code::Unavailable => format!("{} (is the server running?)", status.message()),
            _ => status.message().to_owned(),
        };
        eprintln!("error: {}: {what}", code_name(code));
        return 10 + code as i32;
    }
    eprintln!("error: {err:#}");
    1
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "too many requests",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "conflict",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "not implemented",
        Code::Internal => "internal server error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "not signed in",
    }
}
