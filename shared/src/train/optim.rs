//! AdamW with V-JEPA's parameter groups and schedules, on any backend.
//!
//! - Decoupled weight decay on matrices only; none on biases and 1-D parameters.
//! - Learning rate: linear warm-up from `start_lr` to `lr`, then cosine to `final_lr`.
//! - Weight decay: cosine from `weight_decay` to `weight_decay_end`.
//! - Global gradient-norm clipping.
//!
//! burn's own AdamW has one decay for all parameters, so Amity keeps its own: the moments live
//! on the parameters' device as tensors keyed by parameter id, and the update is a handful of
//! tensor operations per parameter.

use std::collections::HashMap;
use std::f64::consts::PI;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use crate::config::TrainConfig;

/// The learning rate, weight decay and EMA momentum at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Learning rate.
    pub lr: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// EMA momentum of the target encoder.
    pub ema: f64,
}

impl Schedule {
    /// The schedule of `cfg` at local `step` of a run planned for `cfg.steps` steps: the same as
    /// [`Schedule::at_progress`] at `step / steps`, with warm-up counted in steps.
    pub fn at(cfg: &TrainConfig, step: u64) -> Self {
        Self::at_progress(cfg, step as f64 / cfg.steps.max(1) as f64)
    }

    /// The schedule when `done` of the planned run is complete (0 at the start, 1 at the end;
    /// clamped to that range), whoever takes the steps: a federated worker passes the run's
    /// global progress, so every worker follows the same schedule whatever its speed.
    ///
    /// As in V-JEPA (`ipe_scale`), the schedules are laid out over `schedule_stretch` times the
    /// run (1.25 by default): at the end of the run the learning rate has not reached
    /// `final_lr` and the EMA momentum has not reached `ema_end`, so the last steps still move
    /// the target. Warm-up takes the first `warmup / steps` of the run, linearly from `start_lr`
    /// to `lr`; then the learning rate follows a cosine to `final_lr` at `schedule_stretch`.
    /// Weight decay follows a cosine and the EMA momentum a line over `[0, schedule_stretch]`.
    pub fn at_progress(cfg: &TrainConfig, done: f64) -> Self {
        let done = if done.is_finite() {
            done.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let stretch = cfg.schedule_stretch.max(1.0);
        let warm = (cfg.warmup as f64 / cfg.steps.max(1) as f64).min(1.0);
        let lr = if done < warm {
            cfg.start_lr + (cfg.lr - cfg.start_lr) * done / warm
        } else {
            let span = (stretch - warm).max(1e-12);
            let progress = (done - warm) / span;
            cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1.0 + (PI * progress).cos())
        };
        let progress = done / stretch;
        let weight_decay = cfg.weight_decay_end
            + 0.5 * (cfg.weight_decay - cfg.weight_decay_end) * (1.0 + (PI * progress).cos());
        let ema = cfg.ema_start + (cfg.ema_end - cfg.ema_start) * progress;
        Schedule {
            lr,
            weight_decay,
            ema,
        }
    }

    /// The schedule of a run without a planned end (a federation with `max_rounds = 0`) at its
    /// `step`-th step: the warm-up of `cfg.warmup` steps, then constant (peak learning rate,
    /// initial weight decay and EMA momentum), since no decay can be laid out over an unknown
    /// length.
    pub fn open_ended(cfg: &TrainConfig, step: u64) -> Self {
        let lr = if step < cfg.warmup {
            cfg.start_lr + (cfg.lr - cfg.start_lr) * step as f64 / cfg.warmup as f64
        } else {
            cfg.lr
        };
        Schedule {
            lr,
            weight_decay: cfg.weight_decay,
            ema: cfg.ema_start,
        }
    }
}

struct Moments {
    m: Tensor<1>,
    v: Tensor<1>,
}

/// AdamW state: the moments of every parameter and the step count.
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    clip: f64,
    steps: u64,
    moments: HashMap<ParamId, Moments>,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("steps", &self.steps)
            .field("params", &self.moments.len())
            .finish()
    }
}

/// What one optimiser step saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

impl AdamW {
    /// An optimiser with the recipe's betas, epsilon and clip.
    pub fn new(cfg: &TrainConfig) -> Self {
        AdamW {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            clip: cfg.clip_grad,
            steps: 0,
            moments: HashMap::new(),
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update of `module` from `grads` with the learning rate and decay of `schedule`.
    pub fn step<M: Module>(
        &mut self,
        module: M,
        grads: GradientsParams,
        schedule: Schedule,
    ) -> (M, StepInfo) {
        let grad_norm = global_norm(&module, &grads);
        let scale = if self.clip > 0.0 && grad_norm > self.clip {
            self.clip / (grad_norm + 1e-6)
        } else {
            1.0
        };
        self.steps += 1;
        let t = self.steps as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        let mut mapper = Update {
            opt: self,
            grads,
            scale,
            lr: schedule.lr,
            wd: schedule.weight_decay,
            bc1,
            bc2,
        };
        let module = module.map(&mut mapper);
        (module, StepInfo { grad_norm })
    }
}

struct Update<'a> {
    opt: &'a mut AdamW,
    grads: GradientsParams,
    scale: f64,
    lr: f64,
    wd: f64,
    bc1: f64,
    bc2: f64,
}

impl ModuleMapper for Update<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let shape = tensor.shape();
        let n = shape.num_elements();
        let decays = D > 1;
        let p = tensor.inner().reshape([n]);
        let g = grad.reshape([n]) * self.scale;
        let (b1, b2) = (self.opt.beta1, self.opt.beta2);
        let (m, v) = match self.opt.moments.remove(&id) {
            Some(Moments { m, v }) => (
                m * b1 + g.clone() * (1.0 - b1),
                v * b2 + g.clone() * g * (1.0 - b2),
            ),
            None => (g.clone() * (1.0 - b1), g.clone() * g * (1.0 - b2)),
        };
        let denom = (v.clone() / self.bc2).sqrt() + self.opt.eps;
        let mut update = (m.clone() / self.bc1) / denom;
        if decays && self.wd > 0.0 {
            update = update + p.clone() * self.wd;
        }
        let p = p - update * self.lr;
        self.opt.moments.insert(id, Moments { m, v });
        let mut p = Tensor::from_inner(p.reshape(shape));
        if require_grad {
            p = p.require_grad();
        }
        Param::from_mapped_value(id, p, mapper)
    }
}

/// The global L2 norm of the gradients of `module`'s parameters.
fn global_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        parts: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let n = g.shape().num_elements();
                self.parts.push(g.reshape([n]).powi_scalar(2).sum());
            }
        }
    }
    let mut v = Norm {
        grads,
        parts: Vec::new(),
    };
    module.visit(&mut v);
    if v.parts.is_empty() {
        return 0.0;
    }
    let sum: f32 = Tensor::cat(v.parts, 0).sum().into_scalar();
    (sum as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn schedule_warms_up_then_decays_without_reaching_its_end() {
        let mut cfg = Config::preset("tiny").unwrap().train;
        cfg.steps = 1000;
        cfg.warmup = 100;
        let s0 = Schedule::at(&cfg, 0);
        assert!((s0.lr - cfg.start_lr).abs() < 1e-12);
        assert!((Schedule::at(&cfg, 100).lr - cfg.lr).abs() < 1e-12);
        assert!(Schedule::at(&cfg, 500).lr < cfg.lr);
        assert!((s0.weight_decay - 0.04).abs() < 1e-12);
        assert!((s0.ema - cfg.ema_start).abs() < 1e-12);
        // Stretched by 1.25: the end of the run is 80% of the way along every schedule.
        let end = Schedule::at(&cfg, 1000);
        assert!(end.lr > 10.0 * cfg.final_lr, "{end:?}");
        assert!(end.ema < 1.0 && end.ema > cfg.ema_start, "{end:?}");
        assert!((end.ema - (cfg.ema_start + (cfg.ema_end - cfg.ema_start) * 0.8)).abs() < 1e-12);
        // Without the stretch the schedules end where V-JEPA's would at 1.0.
        cfg.schedule_stretch = 1.0;
        let end = Schedule::at(&cfg, 1000);
        assert!((end.lr - cfg.final_lr).abs() < 1e-9);
        assert!((end.weight_decay - 0.4).abs() < 1e-12);
        assert!((end.ema - 1.0).abs() < 1e-12);
        // Progress past the end (a late round) holds the last values.
        assert_eq!(Schedule::at_progress(&cfg, 1.7), end);
    }

    #[test]
    fn an_open_ended_run_holds_its_schedule_after_warm_up() {
        let cfg = Config::preset("tiny").unwrap().train;
        let s = Schedule::open_ended(&cfg, 0);
        assert!((s.lr - cfg.start_lr).abs() < 1e-12);
        for step in [cfg.warmup, 10 * cfg.steps, 100 * cfg.steps] {
            let s = Schedule::open_ended(&cfg, step);
            assert_eq!(
                (s.lr, s.weight_decay, s.ema),
                (cfg.lr, cfg.weight_decay, cfg.ema_start)
            );
        }
    }
}
