//! What the load sends: which wallet, which operation, which amount. Every request
//! body is serialised once before the run; a request only clones a `Bytes`.

use crate::money::format_cents;
use crate::rng::Rng;
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Deposit,
    Withdraw,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deposit => "DEPOSIT",
            Kind::Withdraw => "WITHDRAW",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "DEPOSIT" => Some(Kind::Deposit),
            "WITHDRAW" => Some(Kind::Withdraw),
            _ => None,
        }
    }

    /// The signed effect on the balance of an applied operation.
    pub fn signed(self, cents: i64) -> i64 {
        match self {
            Kind::Deposit => cents,
            Kind::Withdraw => -cents,
        }
    }
}

const DEPOSITS: [i64; 5] = [100, 250, 1000, 1, 10_000];
const WITHDRAWALS: [i64; 5] = [100, 250, 1000, 1, 5000];
/// Withdrawals of this size always exceed the balance: they exercise the
/// 409 path, whose REJECTED audit row the check then looks for.
pub const REJECT_CENTS: i64 = 10_000_000_000;
const VARIANTS: usize = DEPOSITS.len() + WITHDRAWALS.len() + 1;
const REJECT_VARIANT: u8 = (VARIANTS - 1) as u8;

/// One drawn operation: a wallet index and a variant (kind and amount).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub wallet: u32,
    pub variant: u8,
}

pub fn variant(v: u8) -> (Kind, i64) {
    let v = usize::from(v);
    if v < DEPOSITS.len() {
        (Kind::Deposit, DEPOSITS[v])
    } else if v < DEPOSITS.len() + WITHDRAWALS.len() {
        (Kind::Withdraw, WITHDRAWALS[v - DEPOSITS.len()])
    } else {
        (Kind::Withdraw, REJECT_CENTS)
    }
}

pub fn operation_body(wallet: Uuid, kind: Kind, cents: i64) -> String {
    format!(
        r#"{{"walletId":"{wallet}","operationType":"{}","amount":"{}"}}"#,
        kind.as_str(),
        format_cents(cents)
    )
}

#[derive(Debug, Clone)]
pub enum Picker {
    Uniform,
    /// Cumulative distribution over wallet ranks (rank 0 is the hottest).
    Zipf(Vec<f64>),
    /// Every wallet once, in order (many-wallets): `Workload::try_next` runs out.
    EachOnce,
}

impl Picker {
    pub fn zipf(n: usize, exponent: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(exponent);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Picker::Zipf(cdf)
    }

    fn pick(&self, n: usize, rng: &mut Rng) -> usize {
        match self {
            // EachOnce is drawn from the workload's cursor; this is never reached for it.
            Picker::Uniform | Picker::EachOnce => rng.below(n as u64) as usize,
            Picker::Zipf(cdf) => {
                let u = rng.next_f64();
                cdf.partition_point(|&c| c <= u).min(n - 1)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Mix {
    /// Share of DEPOSIT among the ordinary operations.
    pub deposit_ratio: f64,
    /// Share of all operations that are withdrawals bound to be rejected.
    pub reject_ratio: f64,
}

/// Above this many wallets the bodies are formatted per request: 11 bodies of
/// ~110 bytes per wallet would take over a gigabyte for a million wallets.
const PRECOMPUTE_MAX_WALLETS: usize = 100_000;

#[derive(Debug)]
pub struct Workload {
    wallets: Vec<Uuid>,
    /// Empty when the bodies are formatted on demand.
    bodies: Vec<Bytes>,
    picker: Picker,
    mix: Mix,
    /// Next wallet of `Picker::EachOnce`.
    cursor: AtomicUsize,
}

impl Workload {
    pub fn new(wallets: Vec<Uuid>, picker: Picker, mix: Mix) -> Self {
        let mut bodies = Vec::new();
        if wallets.len() <= PRECOMPUTE_MAX_WALLETS {
            bodies.reserve(wallets.len() * VARIANTS);
            for w in &wallets {
                for v in 0..VARIANTS as u8 {
                    let (kind, cents) = variant(v);
                    bodies.push(Bytes::from(operation_body(*w, kind, cents)));
                }
            }
        }
        Self {
            wallets,
            bodies,
            picker,
            mix,
            cursor: AtomicUsize::new(0),
        }
    }

    pub fn wallets(&self) -> &[Uuid] {
        &self.wallets
    }

    /// The next operation, or `None` once `Picker::EachOnce` has handed out
    /// every wallet (the other pickers never run out).
    pub fn try_next(&self, rng: &mut Rng) -> Option<Op> {
        if let Picker::EachOnce = self.picker {
            let i = self.cursor.fetch_add(1, Ordering::Relaxed);
            if i >= self.wallets.len() {
                return None;
            }
            return Some(Op {
                wallet: i as u32,
                variant: self.draw_variant(rng),
            });
        }
        Some(self.next(rng))
    }

    /// The next operation; `Picker::EachOnce` wraps around here (open loop).
    pub fn next(&self, rng: &mut Rng) -> Op {
        let wallet = match self.picker {
            Picker::EachOnce => {
                (self.cursor.fetch_add(1, Ordering::Relaxed) % self.wallets.len().max(1)) as u32
            }
            _ => self.picker.pick(self.wallets.len(), rng) as u32,
        };
        Op {
            wallet,
            variant: self.draw_variant(rng),
        }
    }

    fn draw_variant(&self, rng: &mut Rng) -> u8 {
        if rng.next_f64() < self.mix.reject_ratio {
            REJECT_VARIANT
        } else if rng.next_f64() < self.mix.deposit_ratio {
            rng.below(DEPOSITS.len() as u64) as u8
        } else {
            (DEPOSITS.len() as u64 + rng.below(WITHDRAWALS.len() as u64)) as u8
        }
    }

    pub fn body(&self, op: Op) -> Bytes {
        match self
            .bodies
            .get(op.wallet as usize * VARIANTS + usize::from(op.variant))
        {
            Some(b) => b.clone(),
            None => {
                let (kind, cents) = variant(op.variant);
                Bytes::from(operation_body(
                    self.wallets[op.wallet as usize],
                    kind,
                    cents,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wallets(n: usize) -> Vec<Uuid> {
        (0..n).map(|i| Uuid::from_u128(i as u128 + 1)).collect()
    }

    #[test]
    fn bodies_match_the_api_contract() {
        let w = wallets(2);
        let wl = Workload::new(
            w.clone(),
            Picker::Uniform,
            Mix {
                deposit_ratio: 0.6,
                reject_ratio: 0.0,
            },
        );
        for wallet in 0..2u32 {
            for v in 0..VARIANTS as u8 {
                let body = wl.body(Op { wallet, variant: v });
                let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
                let (kind, cents) = variant(v);
                assert_eq!(json["walletId"], w[wallet as usize].to_string());
                assert_eq!(json["operationType"], kind.as_str());
                assert_eq!(json["amount"], format_cents(cents));
            }
        }
    }

    #[test]
    fn mix_follows_the_ratios() {
        let wl = Workload::new(
            wallets(1),
            Picker::Uniform,
            Mix {
                deposit_ratio: 0.6,
                reject_ratio: 0.1,
            },
        );
        let mut rng = Rng::new(42);
        let (mut dep, mut wd, mut rej) = (0, 0, 0);
        for _ in 0..100_000 {
            let op = wl.next(&mut rng);
            match variant(op.variant) {
                (_, REJECT_CENTS) => rej += 1,
                (Kind::Deposit, _) => dep += 1,
                (Kind::Withdraw, _) => wd += 1,
            }
        }
        assert!((9_000..11_000).contains(&rej), "{rej}");
        // 60% of the remaining 90%.
        assert!((52_000..56_000).contains(&dep), "{dep}");
        assert!((34_000..38_000).contains(&wd), "{wd}");
    }

    #[test]
    fn each_once_hands_out_every_wallet_once_then_runs_out() {
        let w = wallets(PRECOMPUTE_MAX_WALLETS + 3);
        let wl = Workload::new(
            w.clone(),
            Picker::EachOnce,
            Mix {
                deposit_ratio: 1.0,
                reject_ratio: 0.0,
            },
        );
        assert!(wl.bodies.is_empty(), "too many wallets to precompute");
        let mut rng = Rng::new(9);
        let mut seen = vec![false; w.len()];
        while let Some(op) = wl.try_next(&mut rng) {
            assert!(!seen[op.wallet as usize], "wallet {} twice", op.wallet);
            seen[op.wallet as usize] = true;
            assert_eq!(variant(op.variant).0, Kind::Deposit);
            let json: serde_json::Value = serde_json::from_slice(&wl.body(op)).expect("json");
            assert_eq!(json["walletId"], w[op.wallet as usize].to_string());
            assert_eq!(json["amount"], format_cents(variant(op.variant).1));
        }
        assert!(seen.iter().all(|s| *s));
        assert!(wl.try_next(&mut rng).is_none());
    }

    #[test]
    fn zipf_prefers_low_ranks_and_uniform_does_not() {
        let mut rng = Rng::new(3);
        let z = Picker::zipf(1000, 1.0);
        let u = Picker::Uniform;
        let (mut z_top, mut u_top) = (0, 0);
        for _ in 0..100_000 {
            if z.pick(1000, &mut rng) < 10 {
                z_top += 1;
            }
            let i = u.pick(1000, &mut rng);
            assert!(i < 1000);
            if i < 10 {
                u_top += 1;
            }
        }
        // H(10)/H(1000) is about 0.39 of the draws for Zipf(1), 1% for uniform.
        assert!(z_top > 35_000, "{z_top}");
        assert!(u_top < 2_000, "{u_top}");
    }
}
