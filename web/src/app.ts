// The storegate seed flow in a browser: password, QR enrollment, code,
// then the catalogue, all over gRPC-Web (Connect's grpc-web transport).
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AuthService } from "./gen/storegate/auth/v1/auth_pb";
import { ProductService } from "./gen/storegate/product/v1/product_pb";

const params = new URLSearchParams(location.search);
const auth = createClient(
  AuthService,
  createGrpcWebTransport({ baseUrl: params.get("auth") ?? "http://127.0.0.1:50051" }),
);
const products = createClient(
  ProductService,
  createGrpcWebTransport({ baseUrl: params.get("products") ?? "http://127.0.0.1:50052" }),
);

let ticket = "";
let accessToken = "";

const element = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const value = (id: string) => element<HTMLInputElement>(id).value;
const bearer = () => ({ headers: { authorization: `Bearer ${accessToken}` } });

function showError(error: unknown) {
  element("error").textContent =
    error instanceof ConnectError ? `${Code[error.code]}: ${error.rawMessage}` : String(error);
}

function guarded(handler: () => Promise<void>) {
  return (event: Event) => {
    event.preventDefault();
    element("error").textContent = "";
    handler().catch(showError);
  };
}

element("login-form").addEventListener(
  "submit",
  guarded(async () => {
    const begun = await auth.beginLogin({ username: value("username"), password: value("password") });
    ticket = begun.loginTicket;
    if (begun.enrollment) {
      const png = new Blob([begun.enrollment.qrPng], { type: "image/png" });
      element<HTMLImageElement>("qr").src = URL.createObjectURL(png);
      element("secret").textContent = begun.enrollment.secret;
      element("enrollment").hidden = false;
    }
    element("login").hidden = true;
    element("code-step").hidden = false;
    element("code").focus();
  }),
);

element("code-form").addEventListener(
  "submit",
  guarded(async () => {
    const tokens = await auth.completeLogin({ loginTicket: ticket, code: value("code").trim() });
    accessToken = tokens.accessToken;
    element("code-step").hidden = true;
    element("catalogue").hidden = false;
    element("signed-in").textContent = `as ${value("username")}`;
    await refresh();
  }),
);

element("create-form").addEventListener(
  "submit",
  guarded(async () => {
    await products.createProduct(
      {
        product: { name: value("name"), price: value("price"), stock: BigInt(value("stock")) },
        requestId: crypto.randomUUID(),
      },
      bearer(),
    );
    element<HTMLFormElement>("create-form").reset();
    await refresh();
  }),
);

async function refresh() {
  const page = await products.listProducts({ pageSize: 50 }, bearer());
  const rows = page.products.map((p) => {
    const row = document.createElement("tr");
    for (const [text, numeric] of [
      [String(p.id), true],
      [p.name, false],
      [p.price, true],
      [String(p.stock), true],
    ] as const) {
      const cell = document.createElement("td");
      cell.textContent = text;
      if (numeric) cell.className = "num";
      row.append(cell);
    }
    return row;
  });
  element("products").replaceChildren(...rows);
  element("total").textContent = `${page.totalSize} product(s)`;
}
