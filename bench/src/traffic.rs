//! What a shop's callers ask for: pages of listings in every order and
//! size, first pages mostly and some further, and searches with the words
//! shoppers type (see `storegate_testkit::catalogue` for the words in the
//! catalogue). Different callers rarely ask for the very same page at once,
//! as in a real shop, so nothing here favours reads that share a statement.

use std::sync::Mutex;

use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use storegate_testkit::catalogue::{Commonness, word};

/// Every order a listing can have.
pub const ORDERS: [&str; 8] =
    ["id", "id desc", "name", "name desc", "price", "price desc", "create_time", "create_time desc"];

/// Page sizes shop front-ends ask for.
const PAGE_SIZES: [i32; 6] = [10, 20, 24, 48, 50, 100];

/// The pages after the first a caller reads: none for half of them, one
/// for a quarter, and so on (at most 8).
fn further_pages(rng: &mut impl Rng) -> u32 {
    let mut pages = 0;
    while pages < 8 && rng.gen_bool(0.5) {
        pages += 1;
    }
    pages
}

/// A caller reading a listing page by page.
#[derive(Debug, Clone)]
pub struct Browse<T> {
    pub order_by: &'static str,
    pub page_size: i32,
    /// How to ask for the next page (a page token, a cursor), once a page
    /// has been read and while the caller goes on.
    pub next: Option<T>,
    pages_left: u32,
}

impl<T> Browse<T> {
    fn start(rng: &mut impl Rng) -> Browse<T> {
        Browse {
            order_by: ORDERS.choose(rng).expect("orders"),
            page_size: *PAGE_SIZES.choose(rng).expect("sizes"),
            next: None,
            pages_left: further_pages(rng),
        }
    }

    /// After a page was read: where the next one starts, if the caller
    /// goes on and there is one.
    pub fn read(&mut self, next: Option<T>) {
        self.next = next.filter(|_| self.pages_left > 0);
        self.pages_left = self.pages_left.saturating_sub(1);
    }
}

/// Each worker's own browsing and random numbers (one lock per worker, so
/// never contended).
pub struct Callers<T>(Vec<Mutex<(Browse<T>, StdRng)>>);

impl<T: Clone> Callers<T> {
    pub fn new(workers: usize) -> Callers<T> {
        Callers(
            (0..workers)
                .map(|worker| {
                    let mut rng = StdRng::seed_from_u64(worker as u64);
                    Mutex::new((Browse::start(&mut rng), rng))
                })
                .collect(),
        )
    }

    /// The page `worker` asks for next: its browse goes on, or a new one starts.
    pub fn next_page(&self, worker: usize) -> Browse<T> {
        let mut state = self.0[worker].lock().expect("not poisoned");
        let (browse, rng) = &mut *state;
        if browse.next.is_none() {
            *browse = Browse::start(rng);
        }
        browse.clone()
    }

    /// What `worker` read: `next` continues its browse.
    pub fn read(&self, worker: usize, next: Option<T>) {
        self.0[worker].lock().expect("not poisoned").0.read(next);
    }

    /// A random number from `worker`'s own generator.
    pub fn with_rng<R>(&self, worker: usize, f: impl FnOnce(&mut StdRng) -> R) -> R {
        f(&mut self.0[worker].lock().expect("not poisoned").1)
    }
}

/// What a shopper types into the search box, and how its results are to
/// be ordered.
#[derive(Debug, Clone)]
pub struct Search {
    pub query: String,
    pub order_by: &'static str,
    pub page_size: i32,
}

/// A search as shoppers make them: a product word (35%), two (20%), a
/// word and the start of another as typed (15%), a model name (10%), a
/// product word and a model name (5%), a word the catalogue does not have
/// (10%), one of the commonest words (5%). Most by relevance, some by price.
pub fn search(rng: &mut impl Rng) -> Search {
    let common = |rng: &mut _| word(Commonness::Common, rng);
    let query = match rng.gen_range(0..100) {
        0..35 => common(rng).to_owned(),
        35..55 => format!("{} {}", common(rng), common(rng)),
        55..70 => {
            let next = common(rng);
            format!("{} {}", common(rng), &next[..next.len().min(rng.gen_range(3..=5))])
        }
        70..80 => word(Commonness::Rare, rng).to_owned(),
        80..85 => format!("{} {}", common(rng), word(Commonness::Rare, rng)),
        85..95 => format!("{}q", word(Commonness::Rare, rng)),
        _ => word(Commonness::VeryCommon, rng).to_owned(),
    };
    let order_by = if rng.gen_bool(0.8) { "relevance" } else { ["price", "price desc"][rng.gen_range(0..2)] };
    Search { query, order_by, page_size: [20, 24, 48][rng.gen_range(0..3)] }
}

/// A search for a model name: tens of matches in a million products.
pub fn rare_search(rng: &mut impl Rng) -> Search {
    Search { query: word(Commonness::Rare, rng).to_owned(), order_by: "relevance", page_size: 20 }
}
