//! A federated variant: the coordinator's defaults with some keys changed, and the attack a
//! hostile worker 0 plays.

use amity_coordinator::aggregate::{AggregationConfig, OuterConfig};
use amity_coordinator::config::CoreConfig;
use amity_shared::config::{Config, Objective};
use amity_shared::federated::TargetPolicy;
use amity_shared::federated::codec::CodecSpec;

/// One federated configuration: the coordinator defaults with some keys changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// How it was written (`default`, `up=fp32,down=fp32`, ...): its name in the report.
    pub name: String,
    /// Uplink codec.
    pub up: CodecSpec,
    /// Downlink codec.
    pub down: CodecSpec,
    /// Target-encoder policy.
    pub policy: TargetPolicy,
    /// Outer optimiser.
    pub outer: OuterConfig,
    /// The anti-collapse objective of the inner steps.
    pub objective: Objective,
    /// Held-out clips the coordinator scores updates on (0: no contribution scoring).
    pub held_out: usize,
    /// Whether the last round flushes every residual densely.
    pub flush: bool,
    /// What worker 0 does to its update (a hostile institution), if anything.
    pub attack: Attack,
    /// Aggregation settings (screens).
    pub aggregation: AggregationConfig,
}

/// A model attack by worker 0: what it does to its (decoded) update before the coordinator sees
/// it. Written `none`, `flip`, `scale:K` or `noise:S`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    /// An honest worker 0.
    None,
    /// The update negated (at the honest norm: norm screens cannot see it).
    Flip,
    /// The update times `K`.
    Scale(f32),
    /// Gaussian noise of `S` times the update's own root-mean-square value, in its place.
    Noise(f32),
}

impl std::str::FromStr for Attack {
    type Err = amity_shared::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || amity_shared::UnknownName {
            what: "attack",
            got: s.to_owned(),
            expected: &["none", "flip", "scale:K", "noise:S"],
        };
        let arg = |v: &str| v.parse::<f32>().map_err(|_| bad());
        match s.split_once(':') {
            None if s == "none" => Ok(Attack::None),
            None if s == "flip" => Ok(Attack::Flip),
            Some(("scale", k)) => Ok(Attack::Scale(arg(k)?)),
            Some(("noise", k)) => Ok(Attack::Noise(arg(k)?)),
            _ => Err(bad()),
        }
    }
}

impl Attack {
    /// Applies the attack to `values` (round `round` seeds the noise).
    pub fn apply(self, values: &mut [f32], round: u64) {
        match self {
            Attack::None => {}
            Attack::Flip => values.iter_mut().for_each(|v| *v = -*v),
            Attack::Scale(k) => values.iter_mut().for_each(|v| *v *= k),
            Attack::Noise(s) => {
                let rms = (values.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
                    / values.len().max(1) as f64)
                    .sqrt();
                let mut rng = amity_shared::rng::Rng::derive(0xa77ac, &[round]);
                values
                    .iter_mut()
                    .for_each(|v| *v = (s as f64 * rms * rng.normal()) as f32);
            }
        }
    }
}

/// A variant that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad variant `{0}`: expected `default` or key=value pairs joined by `,` with keys up, down \
     (codec names), policy (local-ema, coordinator-ema), lr, mu (outer SGD), nesterov \
     (true/false), objective (ema, vicreg, sigreg), held_out (clips scored on, 0: off), flush \
     (true/false), attack (none, flip, scale:K, noise:S: worker 0 hostile), agree (min_agreement), \
     clip (clip_ratio)"
)]
pub struct BadVariant(pub String);

impl std::str::FromStr for Variant {
    type Err = BadVariant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadVariant(s.to_owned());
        let core = CoreConfig::new(Config::preset("tiny").expect("preset"));
        let mut v = Variant {
            name: s.to_owned(),
            up: core.codec,
            down: core.downlink_codec,
            policy: core.target_policy,
            outer: core.outer,
            objective: core.run.train.objective,
            held_out: core.aggregation.held_out_clips,
            flush: core.rounds.flush,
            attack: Attack::None,
            aggregation: core.aggregation,
        };
        if s == "default" {
            return Ok(v);
        }
        for pair in s.split(',') {
            let (k, val) = pair.split_once('=').ok_or_else(bad)?;
            match k {
                "up" => v.up = val.parse().map_err(|_| bad())?,
                "down" => v.down = val.parse().map_err(|_| bad())?,
                "policy" => v.policy = val.parse().map_err(|_| bad())?,
                "objective" => {
                    v.objective = serde_json::from_value(serde_json::Value::String(val.into()))
                        .map_err(|_| bad())?
                }
                "lr" => v.outer.lr = val.parse().map_err(|_| bad())?,
                "mu" => v.outer.momentum = val.parse().map_err(|_| bad())?,
                "nesterov" => v.outer.nesterov = val.parse().map_err(|_| bad())?,
                "held_out" => v.held_out = val.parse().map_err(|_| bad())?,
                "flush" => v.flush = val.parse().map_err(|_| bad())?,
                "attack" => v.attack = val.parse().map_err(|_| bad())?,
                "agree" => v.aggregation.min_agreement = val.parse().map_err(|_| bad())?,
                "clip" => v.aggregation.clip_ratio = val.parse().map_err(|_| bad())?,
                _ => return Err(bad()),
            }
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_from_the_defaults() {
        let d: Variant = "default".parse().unwrap();
        let v: Variant = "up=fp32,down=topk0.1/64+int8,policy=local-ema,lr=1,mu=0,objective=sigreg"
            .parse()
            .unwrap();
        assert_eq!(v.up, CodecSpec::FP32);
        assert_eq!(v.down, "topk0.1/64+int8".parse().unwrap());
        assert_eq!(v.policy, TargetPolicy::LocalEma);
        assert_eq!((v.outer.lr, v.outer.momentum), (1.0, 0.0));
        assert_eq!(v.outer.nesterov, d.outer.nesterov);
        assert_eq!(v.objective, Objective::Sigreg);
        for bad in ["up=zip", "lr", "colour=red", "policy=nobody", "attack=melt"] {
            assert!(bad.parse::<Variant>().is_err(), "{bad}");
        }
        let a: Variant = "attack=scale:-2".parse().unwrap();
        assert_eq!(a.attack, Attack::Scale(-2.0));
        let mut v = vec![1.0f32, -2.0];
        Attack::Flip.apply(&mut v, 0);
        assert_eq!(v, [-1.0, 2.0]);
        Attack::Noise(1.0).apply(&mut v, 0);
        assert!(v != [-1.0, 2.0] && v.iter().all(|x| x.is_finite()));
    }
}
