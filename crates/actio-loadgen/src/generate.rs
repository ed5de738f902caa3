//! Synthetic card payments with a realistic shape.

use actio_core::tx::{AttrValue, Channel, Transaction};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Zipf};
use serde::Deserialize;

/// Generator settings (scenario files under `loadtest/` set them).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenConfig {
    /// Seed: same seed, same transactions.
    pub seed: u64,
    /// Distinct cards; card popularity is Zipf-distributed.
    pub cards: u64,
    /// Distinct merchants (Zipf).
    pub merchants: u64,
    /// Zipf exponent of card and merchant popularity (1.0–1.3 is realistic).
    pub zipf_exponent: f64,
    /// Median amount in major units (log-normal).
    pub median_amount: f64,
    /// Share of transactions that belong to injected fraud episodes (0..1).
    pub fraud_share: f64,
    /// Share of cross-border transactions in normal traffic.
    pub cross_border_share: f64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            seed: 42,
            // Skewed but plausible: the top 1% of cards carry ~25% of the traffic and
            // the hottest card ~0.5%. (An exponent of 1.1 puts ~9% on one card, which
            // makes every velocity rule fire on it.)
            cards: 1_000_000,
            merchants: 50_000,
            zipf_exponent: 0.7,
            median_amount: 40.0,
            fraud_share: 0.02,
            cross_border_share: 0.05,
        }
    }
}

impl GenConfig {
    /// Checks ranges; errors name the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.cards < 1 || self.merchants < 1 {
            return Err("`cards` and `merchants` must be ≥ 1".into());
        }
        if self.zipf_exponent.is_nan() || self.zipf_exponent <= 0.0 {
            return Err("`zipf_exponent` must be > 0".into());
        }
        if self.median_amount.is_nan() || self.median_amount <= 0.0 {
            return Err("`median_amount` must be > 0".into());
        }
        for (name, v) in [("fraud_share", self.fraud_share), ("cross_border_share", self.cross_border_share)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("`{name}` must be within 0..=1"));
            }
        }
        Ok(())
    }
}

const COUNTRIES: [&str; 10] = ["US", "US", "US", "US", "GB", "DE", "FR", "CA", "ES", "NL"];
const FAR_COUNTRIES: [&str; 6] = ["NG", "RU", "BR", "VN", "ID", "UA"];
const COMMON_MCC: [u16; 12] = [5411, 5812, 5541, 5311, 5912, 5999, 4111, 5814, 5732, 4121, 7011, 5691];
const RISKY_MCC: [u16; 4] = [7995, 6051, 4829, 5967];

/// What kind of fraud an episode simulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// Many tiny e-commerce payments on one card, different merchants.
    CardTesting,
    /// One card used in several far-away countries in a row.
    GeoHopping,
    /// A big payment at a high-risk merchant category.
    RiskyMerchant,
    /// A brand-new card spending big.
    NewCardBigSpend,
    /// Cash withdrawals abroad.
    AtmAbroad,
}

struct Episode {
    card: u64,
    pattern: Pattern,
    left: u32,
}

/// Makes transactions; deterministic per seed.
pub struct Generator {
    cfg: GenConfig,
    run_id: String,
    rng: StdRng,
    cards: Zipf<f64>,
    merchants: Zipf<f64>,
    amount: LogNormal<f64>,
    episodes: Vec<Episode>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator").field("cfg", &self.cfg).field("run_id", &self.run_id).finish_non_exhaustive()
    }
}

/// A stable pseudo-random number for an entity, so a card keeps its home country,
/// age and device across the run.
fn hash(x: u64, salt: u64) -> u64 {
    let mut z = x.wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Generator {
    /// A generator; `run_id` prefixes transaction ids (`<run_id>-<seq>`).
    pub fn new(cfg: GenConfig, run_id: &str) -> Result<Self, String> {
        cfg.validate()?;
        let cards = Zipf::new(cfg.cards as f64, cfg.zipf_exponent).map_err(|e| format!("cards: {e}"))?;
        let merchants = Zipf::new(cfg.merchants as f64, cfg.zipf_exponent).map_err(|e| format!("merchants: {e}"))?;
        let amount = LogNormal::new(cfg.median_amount.ln(), 1.0).map_err(|e| format!("median_amount: {e}"))?;
        Ok(Generator { rng: StdRng::seed_from_u64(cfg.seed), cfg, run_id: run_id.to_string(), cards, merchants, amount, episodes: Vec::new() })
    }

    /// The id of the `seq`-th transaction.
    pub fn id_of(&self, seq: u64) -> String {
        format!("{}-{seq}", self.run_id)
    }

    /// The `seq`-th transaction, created at `created_at` (ns; the intended send time).
    pub fn next(&mut self, seq: u64, created_at: i64) -> Transaction {
        // Fraud episodes interleave with normal traffic.
        if self.rng.random_bool(self.cfg.fraud_share) {
            if self.episodes.len() < 16 {
                let pattern = match self.rng.random_range(0..5) {
                    0 => Pattern::CardTesting,
                    1 => Pattern::GeoHopping,
                    2 => Pattern::RiskyMerchant,
                    3 => Pattern::NewCardBigSpend,
                    _ => Pattern::AtmAbroad,
                };
                let left = match pattern {
                    Pattern::CardTesting => 12,
                    Pattern::GeoHopping => 5,
                    Pattern::AtmAbroad => 3,
                    _ => 1,
                };
                let card = self.rng.random_range(0..self.cfg.cards) + self.cfg.cards; // cards outside the normal range
                self.episodes.push(Episode { card, pattern, left });
            }
            let i = self.rng.random_range(0..self.episodes.len());
            let (card, pattern) = (self.episodes[i].card, self.episodes[i].pattern);
            self.episodes[i].left -= 1;
            if self.episodes[i].left == 0 {
                self.episodes.swap_remove(i);
            }
            return self.fraud(seq, created_at, card, pattern);
        }
        let card = self.cards.sample(&mut self.rng) as u64;
        let mut tx = self.normal(seq, created_at, card);
        if self.rng.random_bool(self.cfg.cross_border_share) {
            tx.country = COUNTRIES[self.rng.random_range(0..COUNTRIES.len())].to_string();
        }
        tx
    }

    fn normal(&mut self, seq: u64, created_at: i64, card: u64) -> Transaction {
        let home = COUNTRIES[(hash(card, 1) % COUNTRIES.len() as u64) as usize];
        let merchant = self.merchants.sample(&mut self.rng) as u64;
        let channel = match self.rng.random_range(0..100) {
            0..=54 => Channel::Pos,
            55..=92 => Channel::Ecom,
            93..=97 => Channel::Atm,
            _ => Channel::Moto,
        };
        let amount = self.amount.sample(&mut self.rng).clamp(0.5, 20_000.0);
        let device = (channel == Channel::Ecom).then(|| {
            // Mostly the card's usual device; now and then a new one.
            let n = if self.rng.random_bool(0.97) { 0 } else { self.rng.random_range(1..1000) };
            format!("dev-{:x}-{n}", hash(card, 2) & 0xffff_ffff)
        });
        let ip_country = (channel == Channel::Ecom).then(|| if self.rng.random_bool(0.98) { home.to_string() } else { COUNTRIES[self.rng.random_range(0..COUNTRIES.len())].to_string() });
        let mut attrs = std::collections::BTreeMap::new();
        if channel == Channel::Ecom {
            attrs.insert("three_ds".to_string(), AttrValue::Bool(self.rng.random_bool(0.7)));
        }
        Transaction {
            id: self.id_of(seq),
            card_id: format!("card-{card}"),
            account_id: format!("acct-{}", hash(card, 3) % (self.cfg.cards / 2 + 1)),
            device_id: device,
            merchant_id: format!("m-{merchant}"),
            amount_minor: (amount * 100.0).round() as i64,
            currency: "USD".into(),
            mcc: COMMON_MCC[(hash(merchant, 4) % COMMON_MCC.len() as u64) as usize],
            country: home.to_string(),
            card_country: home.to_string(),
            ip_country,
            channel,
            card_age_days: (30 + hash(card, 5) % 3000) as u32,
            created_at,
            attrs,
        }
    }

    fn fraud(&mut self, seq: u64, created_at: i64, card: u64, pattern: Pattern) -> Transaction {
        let mut tx = self.normal(seq, created_at, card);
        tx.attrs.insert("synthetic_fraud".into(), AttrValue::Str(format!("{pattern:?}")));
        let far = FAR_COUNTRIES[self.rng.random_range(0..FAR_COUNTRIES.len())].to_string();
        match pattern {
            Pattern::CardTesting => {
                tx.channel = Channel::Ecom;
                tx.amount_minor = self.rng.random_range(50..300);
                tx.merchant_id = format!("m-{}", self.rng.random_range(0..self.cfg.merchants));
                tx.mcc = 5999;
                tx.device_id = Some(format!("dev-{:x}", self.rng.random::<u32>()));
                tx.ip_country = Some(far);
            }
            Pattern::GeoHopping => {
                tx.channel = Channel::Pos;
                tx.country = far;
                tx.amount_minor = self.rng.random_range(20_000..150_000);
            }
            Pattern::RiskyMerchant => {
                tx.mcc = RISKY_MCC[self.rng.random_range(0..RISKY_MCC.len())];
                tx.amount_minor = self.rng.random_range(100_000..500_000);
                tx.channel = Channel::Ecom;
                tx.ip_country = Some(far);
            }
            Pattern::NewCardBigSpend => {
                tx.card_age_days = self.rng.random_range(0..5);
                tx.amount_minor = self.rng.random_range(200_000..900_000);
                tx.mcc = 5732;
            }
            Pattern::AtmAbroad => {
                tx.channel = Channel::Atm;
                tx.device_id = None;
                tx.ip_country = None;
                tx.mcc = 6011;
                tx.country = far;
                tx.amount_minor = self.rng.random_range(20_000..100_000);
            }
        }
        tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn same_seed_same_transactions_and_all_valid() {
        let mut a = Generator::new(GenConfig::default(), "r").unwrap();
        let mut b = Generator::new(GenConfig::default(), "r").unwrap();
        for i in 0..5000 {
            let ta = a.next(i, 1_000 + i as i64);
            assert_eq!(ta, b.next(i, 1_000 + i as i64));
            ta.validate().unwrap_or_else(|e| panic!("{e}: {ta:?}"));
        }
    }

    #[test]
    fn keys_are_skewed_and_fraud_is_injected() {
        let mut g = Generator::new(GenConfig::default(), "r").unwrap();
        let mut per_card: HashMap<String, u32> = HashMap::new();
        let mut fraud = 0;
        let n = 100_000;
        for i in 0..n {
            let t = g.next(i, 0);
            fraud += t.attrs.contains_key("synthetic_fraud") as u32;
            *per_card.entry(t.card_id).or_default() += 1;
        }
        let mut counts: Vec<u32> = per_card.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        // The top 1% of the card population (10,000 of 1,000,000 cards).
        let top_1pct: u32 = counts.iter().take((GenConfig::default().cards / 100) as usize).sum();
        let hottest = counts[0];
        assert!(top_1pct as f64 > 0.15 * n as f64, "the top 1% of cards should carry >15% of traffic, got {top_1pct}");
        assert!(hottest as f64 > 0.002 * n as f64, "the hottest card is hot: {hottest}");
        assert!((1000..3000).contains(&fraud), "about 2% fraud, got {fraud}");
    }
}
