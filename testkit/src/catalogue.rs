//! A made-up catalogue shaped like a shop's, for benchmarks and for tests
//! that need a large one: names of 2–5 words and descriptions of 8–30,
//! drawn from a vocabulary whose word frequencies fall off as a natural
//! language's do (Zipf's law), so that one word matches most of the
//! catalogue ("with"), a product word a few percent ("teapot"), and a model
//! name a handful of products. The same index always gives the same
//! product, so a catalogue can be grown in steps and searched for words
//! known to be in it.

use std::sync::LazyLock;

use product_service::{domain::Price, store::ProductFields};
use rand::{
    Rng, SeedableRng,
    distributions::{Distribution, WeightedIndex},
    rngs::StdRng,
};

/// The common words of product text, most frequent first: what a shop's
/// descriptions repeat, then what its names are made of.
const COMMON: &[&str] = &[
    "with",
    "and",
    "for",
    "the",
    "steel",
    "black",
    "set",
    "white",
    "large",
    "small",
    "stainless",
    "cotton",
    "wood",
    "glass",
    "kitchen",
    "home",
    "grey",
    "blue",
    "red",
    "green",
    "oak",
    "iron",
    "cast",
    "ceramic",
    "leather",
    "linen",
    "wool",
    "bamboo",
    "copper",
    "brass",
    "silver",
    "gold",
    "natural",
    "classic",
    "modern",
    "vintage",
    "portable",
    "compact",
    "heavy",
    "light",
    "soft",
    "warm",
    "waterproof",
    "handmade",
    "organic",
    "recycled",
    "premium",
    "durable",
    "easy",
    "clean",
    "dishwasher",
    "safe",
    "gift",
    "pack",
    "piece",
    "inch",
    "litre",
    "travel",
    "outdoor",
    "garden",
    "office",
    "desk",
    "lamp",
    "chair",
    "table",
    "shelf",
    "mirror",
    "rug",
    "blanket",
    "pillow",
    "towel",
    "curtain",
    "basket",
    "box",
    "bottle",
    "mug",
    "cup",
    "plate",
    "bowl",
    "pan",
    "pot",
    "kettle",
    "teapot",
    "knife",
    "fork",
    "spoon",
    "board",
    "jar",
    "tray",
    "vase",
    "candle",
    "clock",
    "frame",
    "hook",
    "rack",
    "stand",
    "holder",
    "organizer",
    "bag",
    "backpack",
    "wallet",
    "belt",
    "scarf",
    "hat",
    "gloves",
    "socks",
    "shirt",
    "jacket",
    "boots",
    "shoes",
    "sandals",
    "umbrella",
    "watch",
    "ring",
    "necklace",
    "bracelet",
    "earrings",
    "brush",
    "comb",
    "soap",
    "shampoo",
    "lotion",
    "notebook",
    "pen",
    "pencil",
    "marker",
    "paper",
    "envelope",
    "stapler",
    "scissors",
    "tape",
    "glue",
    "charger",
    "cable",
    "adapter",
    "speaker",
    "headphones",
    "keyboard",
    "mouse",
    "monitor",
    "router",
    "battery",
    "torch",
    "tent",
    "sleeping",
    "stove",
    "cooler",
    "hammock",
    "bicycle",
    "helmet",
    "pump",
    "lock",
    "drill",
    "hammer",
    "screwdriver",
    "wrench",
    "saw",
    "ladder",
    "hose",
    "planter",
    "seeds",
    "grill",
    "apron",
    "oven",
    "toaster",
    "blender",
    "grinder",
    "scale",
    "timer",
    "thermometer",
    "filter",
];

/// Syllables the rare words (brand and model names) are made of: three of
/// them make one of 40³ = 64,000 different words.
const SYLLABLES: [&str; 40] = [
    "ka", "lo", "mi", "ve", "ru", "sa", "te", "no", "di", "pa", "ro", "ze", "bi", "fu", "ga", "he", "ji",
    "ku", "ma", "ne", "po", "qui", "ra", "si", "to", "ul", "vi", "wa", "xo", "ya", "zu", "bel", "cor", "dan",
    "fen", "gor", "hal", "lin", "mar", "tor",
];

/// How steeply word frequencies fall with their rank (1 is Zipf's law).
const ZIPF_EXPONENT: f64 = 1.0;

struct Vocabulary {
    words: Vec<String>,
    by_frequency: WeightedIndex<f64>,
}

static VOCABULARY: LazyLock<Vocabulary> = LazyLock::new(|| {
    let rare = (0..SYLLABLES.len().pow(3)).map(|n| {
        let s = |k: usize| SYLLABLES[(n / SYLLABLES.len().pow(k as u32)) % SYLLABLES.len()];
        format!("{}{}{}", s(2), s(1), s(0))
    });
    let words: Vec<String> = COMMON.iter().map(|w| w.to_string()).chain(rare).collect();
    let weights = (1..=words.len()).map(|rank| 1.0 / (rank as f64).powf(ZIPF_EXPONENT));
    Vocabulary { by_frequency: WeightedIndex::new(weights).expect("weights are positive"), words }
});

/// The words a search may look for, by how much of the catalogue they match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commonness {
    /// Among the 4 most frequent: in most products.
    VeryCommon,
    /// A product word of the common vocabulary: a few percent of products.
    Common,
    /// Ranked beyond 30,000: tens of products in a million.
    Rare,
}

/// A word of the vocabulary of this commonness, chosen by `rng`.
pub fn word(commonness: Commonness, rng: &mut impl Rng) -> &'static str {
    let words = &VOCABULARY.words;
    let rank = match commonness {
        Commonness::VeryCommon => rng.gen_range(0..4),
        Commonness::Common => rng.gen_range(4..COMMON.len()),
        Commonness::Rare => rng.gen_range(30_000..words.len()),
    };
    &words[rank]
}

/// Product number `index` of the catalogue (from 0): the same fields for
/// the same index, every time.
pub fn product(index: u64) -> ProductFields {
    let mut rng = StdRng::seed_from_u64(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let vocabulary = &*VOCABULARY;
    let words = |n: usize, rng: &mut StdRng| -> Vec<&'static str> {
        (0..n).map(|_| vocabulary.words[vocabulary.by_frequency.sample(rng)].as_str()).collect()
    };
    let name_words = rng.gen_range(2..=5);
    let mut name = words(name_words, &mut rng).join(" ");
    // Names start with a capital, as a shop writes them.
    if let Some(first) = name.get(..1) {
        name.replace_range(..1, &first.to_uppercase());
    }
    let description_words = rng.gen_range(8..=30);
    let description = words(description_words, &mut rng).join(" ") + ".";
    // Prices spread over orders of magnitude, most under 50.
    let cents = (100.0 * 10f64.powf(rng.gen_range(0.0..3.0))) as i64 + rng.gen_range(0..100);
    let price = Price::parse(&format!("{}.{:02}", cents / 100, cents % 100)).expect("a valid price");
    ProductFields { name, description, price, stock: rng.gen_range(0..=500) }
}
