//! Counterbalanced violation sets: IntPhys-style quadruplets.
//!
//! A pair of a possible video and its impossible twin is confounded whenever the two differ in
//! something besides the law: in "the object goes behind the bar and never comes out" the
//! impossible twin is the *quieter* video, so any forecaster that finds motion costly prefers
//! it. IntPhys (Riochet et al.) removes such confounds with matched quadruplets, and so do we:
//! two possible videos and two impossible ones, built so that every part that differs appears
//! once in a possible video and once in an impossible one. A detector that merely prefers
//! empty scenes, fast motion, walls or a colour scores 50%; only the law itself separates them.
//!
//! Four of the five kinds splice two possible videos at a cut frame `c`: `P0 = A`, `P1 = B`,
//! `I0 = A[..c] + B[c..]`, `I1 = B[..c] + A[c..]`, so each frame segment (A's past, B's past,
//! A's future, B's future) is in exactly one possible and one impossible video:
//!
//! | kind        | A                                  | B                           |
//! |-------------|------------------------------------|-----------------------------|
//! | permanence  | the object passes behind a bar     | no object (`c` while hidden) |
//! | continuity  | the object on one path             | the same object elsewhere   |
//! | shape       | the object                         | the same path, another shape |
//! | colour      | the object                         | the same path, another colour |
//!
//! So permanence gives "enters and re-emerges" and "never there" (possible), "enters and never
//! re-emerges" and "appears from behind without entering" (impossible). **Solidity** crosses two
//! factors instead: a wall drawn or not, and the object's motion bouncing at the wall or going
//! on. Possible: bounces off the visible wall; goes on with no wall. Impossible: passes through
//! the visible wall; bounces off nothing where the wall was.

use serde::{Deserialize, Serialize};

use super::{
    COLOURS, Scene, Shape, SynthConfig, SynthVideo, Violation, ViolationKind, Wall, draw_scene,
    full_occluder_width, simulate,
};
use crate::rng::Rng;

/// Which law a quadruplet tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuadrupletKind {
    /// An object hidden behind a bar still exists (and nothing comes from nowhere).
    Permanence,
    /// An object does not pass through a wall (and does not bounce off nothing).
    Solidity,
    /// An object moves along a continuous path (no jumps).
    Continuity,
    /// An object keeps its shape.
    Shape,
    /// An object keeps its colour.
    Colour,
}

impl QuadrupletKind {
    /// All kinds, in the order a set takes them in turn.
    pub const ALL: [QuadrupletKind; 5] = [
        QuadrupletKind::Permanence,
        QuadrupletKind::Solidity,
        QuadrupletKind::Continuity,
        QuadrupletKind::Shape,
        QuadrupletKind::Colour,
    ];

    /// The kind of the `i`-th quadruplet of a set in which the kinds take turns.
    pub fn in_turn(i: usize) -> QuadrupletKind {
        Self::ALL[i % Self::ALL.len()]
    }

    /// The label an impossible video of this kind carries (the nearest pair kind).
    fn violation(self) -> ViolationKind {
        match self {
            QuadrupletKind::Permanence => ViolationKind::NoReappear,
            QuadrupletKind::Solidity => ViolationKind::PassThroughWall,
            QuadrupletKind::Continuity => ViolationKind::Teleport,
            QuadrupletKind::Shape => ViolationKind::ShapeChange,
            QuadrupletKind::Colour => ViolationKind::ColourChange,
        }
    }
}

impl std::fmt::Display for QuadrupletKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuadrupletKind::Permanence => "permanence",
            QuadrupletKind::Solidity => "solidity",
            QuadrupletKind::Continuity => "continuity",
            QuadrupletKind::Shape => "shape",
            QuadrupletKind::Colour => "colour",
        })
    }
}

/// Two possible and two impossible videos, counterbalanced (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Quadruplet {
    /// The law tested.
    pub kind: QuadrupletKind,
    /// The possible videos.
    pub possible: [SynthVideo; 2],
    /// The impossible videos; each carries its violation (kind and first frame) in its labels.
    pub impossible: [SynthVideo; 2],
    /// The frame the four videos' stories part: the cut of a splice, the contact with the wall.
    pub event: usize,
}

/// Seed of the first quadruplet of the surprise bench's test set.
pub const QUADRUPLET_SEED: u64 = 400_000_000;

/// Seed of the first quadruplet of the set the bench chooses its scoring on, apart from the
/// test set.
pub const VALIDATION_QUADRUPLET_SEED: u64 = 500_000_000;

/// The longest run of frames (at `frame_step` 1) an object stays fully hidden in a permanence
/// quadruplet, so that a window of the tiny preset's 8 frames holds its entry and its exit.
pub const MAX_HIDDEN_FRAMES: usize = 3;

/// The `i`-th quadruplet of the set starting at `first_seed` (kinds in turn).
pub fn quadruplet_in_set(cfg: &SynthConfig, first_seed: u64, i: usize) -> Quadruplet {
    quadruplet(cfg, QuadrupletKind::in_turn(i), first_seed + i as u64)
}

/// The quadruplet of `kind` drawn from `seed`: scenes are drawn from `(seed, attempt)` until
/// one shows the event in the video's middle half with the object seen before and after it.
///
/// # Panics
/// If no attempt of 1000 fits, which means `cfg` cannot show the event at all (fewer than
/// about 12 frames, or objects too large for the frame).
pub fn quadruplet(cfg: &SynthConfig, kind: QuadrupletKind, seed: u64) -> Quadruplet {
    for attempt in 0..1000u64 {
        let s = Rng::derive(seed, &[0x9a4d, attempt]).next_u64();
        let built = match kind {
            QuadrupletKind::Permanence => permanence(cfg, s),
            QuadrupletKind::Solidity => solidity(cfg, s),
            _ => change(cfg, s, kind),
        };
        if let Some(q) = built {
            return q;
        }
    }
    panic!(
        "no {kind} quadruplet fits videos of {} frames with objects of radius {:?}",
        cfg.frames, cfg.radius
    )
}

/// One object, no occluder, no wall, the scene's own background and gravity.
fn single_object_scene(cfg: &SynthConfig, seed: u64) -> Scene {
    let one = SynthConfig {
        max_objects: 1,
        occluder_prob: 0.0,
        wall_prob: 0.0,
        ..cfg.clone()
    };
    draw_scene(&one, seed)
}

/// The middle half of the video: where an event may happen.
fn middle(cfg: &SynthConfig) -> std::ops::Range<usize> {
    cfg.frames / 4..(3 * cfg.frames).div_ceil(4)
}

/// `a`'s frames before `cut`, `b`'s from `cut` on, labelled with `kind`'s violation at `cut`.
fn splice(a: &SynthVideo, b: &SynthVideo, cut: usize, kind: QuadrupletKind) -> SynthVideo {
    let px = a.size * a.size * 3;
    let mut pixels = a.pixels[..cut * px].to_vec();
    pixels.extend_from_slice(&b.pixels[cut * px..]);
    let mut labels = a.labels.clone();
    labels.frames.truncate(cut);
    labels.frames.extend_from_slice(&b.labels.frames[cut..]);
    labels.violation = Some(Violation {
        kind: kind.violation(),
        frame: cut,
    });
    SynthVideo {
        size: a.size,
        pixels,
        labels,
    }
}

/// The four videos of a splice kind from the possible `a` and `b` cut at `cut`.
fn spliced(a: SynthVideo, b: SynthVideo, cut: usize, kind: QuadrupletKind) -> Quadruplet {
    let impossible = [splice(&a, &b, cut, kind), splice(&b, &a, cut, kind)];
    Quadruplet {
        kind,
        possible: [a, b],
        impossible,
        event: cut,
    }
}

/// Object permanence: the object crosses a bar just wide enough to hide it, fully hidden for
/// 1..=[`MAX_HIDDEN_FRAMES`] frames around the cut, seen at least two frames before and after.
fn permanence(cfg: &SynthConfig, seed: u64) -> Option<Quadruplet> {
    let mut rng = Rng::derive(seed, &[0x0cc1]);
    let mut scene = single_object_scene(cfg, seed);
    scene.gravity = false;
    let b = &mut scene.bodies[0];
    // Room for the object on both sides of the bar: 4r + bar <= 1.
    let r_max = ((1.0 - 0.06) / 6.0f64).min(cfg.radius.1);
    b.radius = rng.range_f64(cfg.radius.0.min(r_max), r_max) as f32;
    let w = full_occluder_width(b.radius as f64) as f32 - 0.06 + rng.range_f64(0.02, 0.06) as f32;
    let x0 = rng.range_f64(
        2.0 * b.radius as f64,
        1.0 - 2.0 * b.radius as f64 - w as f64,
    ) as f32;
    scene.occluder = Some([x0, x0 + w]);
    // Start fully in view on one side and reach the bar's centre near the middle of the video.
    let (r, centre) = (b.radius as f64, (x0 + w / 2.0) as f64);
    let left = rng.below(2) == 0;
    let start = if left {
        rng.range_f64(r, x0 as f64 - r)
    } else {
        rng.range_f64((x0 + w) as f64 + r, 1.0 - r)
    };
    let meet = rng.range_f64(0.35, 0.65) * cfg.frames as f64;
    let vx = (centre - start) / meet;
    if vx.abs() > cfg.max_speed || vx.abs() < 0.2 * cfg.max_speed {
        return None;
    }
    b.pos[0] = start as f32;
    b.vel = [vx as f32, (rng.range_f64(-0.2, 0.2) * vx.abs()) as f32];
    let with = simulate(cfg, seed, scene.clone(), None);
    let visible: Vec<bool> = with.labels.frames.iter().map(|f| f[0].visible).collect();
    let first_hidden = visible.iter().position(|v| !v)?;
    let hidden = visible[first_hidden..].iter().take_while(|v| !**v).count();
    let reappears = first_hidden + hidden;
    let seen_after = visible[reappears..].iter().filter(|v| **v).count();
    let cut = first_hidden + hidden / 2;
    let fits = hidden <= MAX_HIDDEN_FRAMES
        && first_hidden >= 2
        && seen_after >= 2
        && visible[reappears..].iter().all(|v| *v)
        && middle(cfg).contains(&cut);
    if !fits {
        return None;
    }
    scene.bodies[0].vanished = true;
    let without = simulate(cfg, seed, scene, None);
    Some(spliced(with, without, cut, QuadrupletKind::Permanence))
}

/// Continuity, shape and colour: the same object changed in one respect, cut in the middle half.
fn change(cfg: &SynthConfig, seed: u64, kind: QuadrupletKind) -> Option<Quadruplet> {
    let mut rng = Rng::derive(seed, &[0xc4a6]);
    let scene = single_object_scene(cfg, seed);
    let range = middle(cfg);
    let cut = range.start + rng.below(range.len().max(1));
    let mut other = scene.clone();
    let b = &mut other.bodies[0];
    match kind {
        QuadrupletKind::Continuity => {
            let r = b.radius as f64;
            b.pos = [
                rng.range_f64(r, 1.0 - r) as f32,
                rng.range_f64(r, 1.0 - r) as f32,
            ];
        }
        QuadrupletKind::Shape => b.shape = Shape::ALL[(b.shape.index() + 1 + rng.below(2)) % 3],
        QuadrupletKind::Colour => {
            b.colour = (b.colour + 1 + rng.below(COLOURS.len() - 1)) % COLOURS.len()
        }
        QuadrupletKind::Permanence | QuadrupletKind::Solidity => {
            unreachable!("{kind} is not a change")
        }
    }
    let a = simulate(cfg, seed, scene, None);
    let b = simulate(cfg, seed, other, None);
    if kind == QuadrupletKind::Continuity {
        // A jump of at least a third of the frame at the cut, both ways.
        let (p, q) = (a.labels.frames[cut][0].pos, b.labels.frames[cut][0].pos);
        if ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt() < 0.33 {
            return None;
        }
    }
    Some(spliced(a, b, cut, kind))
}

/// Solidity: an object heading for a wall, first reaching it in the middle half of the video.
fn solidity(cfg: &SynthConfig, seed: u64) -> Option<Quadruplet> {
    let mut rng = Rng::derive(seed, &[0x5011]);
    let walled = SynthConfig {
        max_objects: 1,
        wall_prob: 1.0,
        ..cfg.clone()
    };
    let mut scene = draw_scene(&walled, seed);
    scene.gravity = false;
    let wall = scene.wall?.x;
    let b = &mut scene.bodies[0];
    // Toward the wall, mostly horizontally.
    let toward = if b.pos[0] < wall[0] { 1.0 } else { -1.0 };
    let speed = rng.range_f64(0.6, 1.0) * cfg.max_speed;
    b.vel = [
        (toward * speed) as f32,
        (rng.range_f64(-0.3, 0.3) * speed) as f32,
    ];
    let bounce = simulate(cfg, seed, scene.clone(), None);
    let mut through_scene = scene.clone();
    through_scene.bodies[0].through_wall = true;
    let through = simulate(cfg, seed, through_scene.clone(), None);
    // The first frame the two part: the frame after the contact.
    let event = (0..cfg.frames)
        .find(|&f| bounce.labels.frames[f][0].pos != through.labels.frames[f][0].pos)?;
    if !middle(cfg).contains(&event) {
        return None;
    }
    let hide = |mut s: Scene| {
        s.wall = s.wall.map(|w| Wall { drawn: false, ..w });
        s
    };
    let mut open_scene = through_scene;
    open_scene.wall = None;
    let goes_on = simulate(cfg, seed, open_scene, None);
    let bounces_off_nothing = simulate(cfg, seed, hide(scene), None);
    let label = |mut v: SynthVideo| {
        v.labels.violation = Some(Violation {
            kind: ViolationKind::PassThroughWall,
            frame: event,
        });
        v
    };
    Some(Quadruplet {
        kind: QuadrupletKind::Solidity,
        possible: [bounce, goes_on],
        impossible: [label(through), label(bounces_off_nothing)],
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SynthConfig {
        SynthConfig::for_size(32, 32)
    }

    fn frames_equal(a: &SynthVideo, b: &SynthVideo, range: std::ops::Range<usize>) -> bool {
        range.into_iter().all(|f| a.frame(f) == b.frame(f))
    }

    #[test]
    fn every_segment_is_once_possible_and_once_impossible() {
        for i in 0..40 {
            let q = quadruplet_in_set(&cfg(), QUADRUPLET_SEED, i);
            let (n, c) = (cfg().frames, q.event);
            assert!(middle(&cfg()).contains(&c), "{}: event at {c}", q.kind);
            let [p0, p1] = &q.possible;
            let [i0, i1] = &q.impossible;
            for v in [i0, i1] {
                assert_eq!(v.labels.violation.map(|v| v.frame), Some(c));
            }
            assert!(p0.labels.violation.is_none() && p1.labels.violation.is_none());
            if q.kind == QuadrupletKind::Solidity {
                // Motion: the impossible ones move as the other scene's possible video.
                let path = |v: &SynthVideo| -> Vec<[f32; 2]> {
                    v.labels.frames.iter().map(|f| f[0].pos).collect()
                };
                assert_eq!(path(i0), path(p1), "passes through = goes on");
                assert_eq!(path(i1), path(p0), "bounces off nothing = bounces");
                assert_ne!(path(p0), path(p1));
                // Scenery: the wall is drawn in p0 and i0, not in p1 and i1; before contact the
                // videos with the same scenery are the same video.
                assert!(frames_equal(p0, i0, 0..c) && frames_equal(p1, i1, 0..c));
                assert!(!frames_equal(p0, p1, 0..1), "the wall shows");
                continue;
            }
            assert!(frames_equal(i0, p0, 0..c) && frames_equal(i0, p1, c..n));
            assert!(frames_equal(i1, p1, 0..c) && frames_equal(i1, p0, c..n));
            assert!(!frames_equal(p0, p1, c..n), "{}: futures differ", q.kind);
            if q.kind != QuadrupletKind::Permanence {
                assert!(!frames_equal(p0, p1, 0..c), "{}: pasts differ", q.kind);
            }
        }
    }

    #[test]
    fn permanence_hides_the_object_at_the_cut_and_shows_it_around() {
        for i in 0..10 {
            let q = quadruplet(&cfg(), QuadrupletKind::Permanence, 7 + i);
            let seen: Vec<bool> = q.possible[0]
                .labels
                .frames
                .iter()
                .map(|f| f[0].visible)
                .collect();
            let c = q.event;
            assert!(!seen[c], "hidden at the cut");
            assert!(seen[..c].iter().filter(|s| **s).count() >= 2);
            assert!(seen[c..].iter().filter(|s| **s).count() >= 2);
            let hidden = seen.iter().filter(|s| !**s).count();
            assert!((1..=MAX_HIDDEN_FRAMES).contains(&hidden), "{hidden}");
            // "Never there" shows no object at all; the spliced ones show it on one side only.
            let never = &q.possible[1].labels.frames;
            assert!(never.iter().all(|f| !f[0].visible));
            let enters = &q.impossible[0].labels.frames;
            assert!(enters[..c].iter().any(|f| f[0].visible));
            assert!(enters[c..].iter().all(|f| !f[0].visible));
        }
    }

    #[test]
    fn solidity_bounces_off_the_wall_it_shows() {
        for i in 0..10 {
            let q = quadruplet(&cfg(), QuadrupletKind::Solidity, 3 + i);
            let c = q.event;
            let v = |video: &SynthVideo, f: usize| video.labels.frames[f][0].vel[0];
            let (bounce, through) = (&q.possible[0], &q.impossible[0]);
            assert!(
                v(bounce, c - 1) * v(bounce, c) < 0.0,
                "reverses at the wall"
            );
            assert!(
                v(through, c - 1) * v(through, c) > 0.0,
                "goes on through it"
            );
        }
    }

    #[test]
    fn quadruplets_are_deterministic() {
        assert_eq!(
            quadruplet_in_set(&cfg(), QUADRUPLET_SEED, 3),
            quadruplet_in_set(&cfg(), QUADRUPLET_SEED, 3)
        );
    }
}
