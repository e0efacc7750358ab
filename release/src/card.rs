//! The model card: `README.md` with YAML front matter in the style of Hugging Face model cards,
//! then the text a downstream user reads first: what the model is, how it was trained and by
//! whom, how it scores, how to load it.

use std::fmt::Write;

use serde::Serialize;

use amity_shared::config::Config;

/// One institution's contribution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contributor {
    /// The institution (its certificate name).
    pub name: String,
    /// Clips it trained on.
    pub samples: u64,
    /// Local optimiser steps it ran.
    pub steps: u64,
    /// Updates of it the coordinator accepted.
    pub updates: u64,
    /// Updates of it the coordinator rejected (screens, contribution scoring, refusals).
    pub rejected: u64,
    /// Mean relative change of the held-out loss its updates caused when applied alone
    /// (negative: they helped), when the coordinator scored them.
    pub score: Option<f64>,
}

/// The corpus the model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CorpusInfo {
    /// BLAKE3 of the corpus `manifest.json`.
    pub manifest_blake3: String,
    /// Shards.
    pub shards: usize,
    /// Clips.
    pub clips: u64,
}

/// One evaluation number, with the randomly initialised encoder's for reference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalResult {
    /// Metric name (`velocity_r2`, `surprise_paired_accuracy`, ...).
    pub metric: String,
    /// The released model's value.
    pub value: f64,
    /// A randomly initialised encoder's value on the same task.
    pub random_init: Option<f64>,
    /// How it was measured.
    pub protocol: String,
}

/// Everything the card says.
#[derive(Debug, Clone)]
pub struct CardInfo {
    /// Release name.
    pub name: String,
    /// Publisher (the coordinator's name).
    pub publisher: String,
    /// The run's config.
    pub config: Config,
    /// Training rounds completed.
    pub round: u64,
    /// Parameters hash of the global state (hex), when from a coordinator.
    pub params: Option<String>,
    /// Parameter counts: encoder, predictor.
    pub parameters: (usize, usize),
    /// The corpus, when known.
    pub corpus: Option<CorpusInfo>,
    /// Contributors, largest first.
    pub contributors: Vec<Contributor>,
    /// Evaluation results.
    pub evaluation: Vec<EvalResult>,
    /// Evaluations not measured for this release (named so nobody assumes them).
    pub not_measured: Vec<String>,
    /// Licence (SPDX id).
    pub licence: String,
}

impl CardInfo {
    /// Clips seen in training, over all contributors.
    pub fn samples_seen(&self) -> u64 {
        self.contributors.iter().map(|c| c.samples).sum()
    }
}

/// A YAML scalar: JSON strings are valid YAML.
fn y(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// Renders the card: YAML front matter, then the sections a downstream user reads.
pub fn render(c: &CardInfo) -> String {
    let mut s = String::new();
    for section in [front_matter, intro, files, training, evaluation, usage] {
        section(c, &mut s);
    }
    s
}

/// The YAML front matter (Hugging Face model-card style).
fn front_matter(c: &CardInfo, s: &mut String) {
    let m = &c.config.model;
    let t = &c.config.train;
    let _ = writeln!(s, "---");
    let _ = writeln!(s, "license: {}", c.licence.to_ascii_lowercase());
    let _ = writeln!(s, "library_name: amity");
    let _ = writeln!(s, "pipeline_tag: video-classification");
    let _ = writeln!(
        s,
        "tags: [video, self-supervised-learning, jepa, v-jepa, world-model, federated-learning]"
    );
    let _ = writeln!(s, "amity:");
    let _ = writeln!(s, "  release: {}", y(&c.name));
    let _ = writeln!(s, "  publisher: {}", y(&c.publisher));
    let _ = writeln!(s, "  preset: {}", y(&c.config.preset));
    let objective = format!("{:?}", t.objective).to_ascii_lowercase();
    let _ = writeln!(s, "  objective: {}", y(&objective));
    let _ = writeln!(s, "  rounds: {}", c.round);
    let _ = writeln!(s, "  samples_seen: {}", c.samples_seen());
    if let Some(p) = &c.params {
        let _ = writeln!(s, "  params_hash: {}", y(p));
    }
    let _ = writeln!(s, "  architecture:");
    let _ = writeln!(
        s,
        "    encoder: {{width: {}, depth: {}, heads: {}, parameters: {}}}",
        m.width, m.depth, m.heads, c.parameters.0
    );
    let _ = writeln!(
        s,
        "    predictor: {{width: {}, depth: {}, heads: {}, parameters: {}}}",
        m.pred_width, m.pred_depth, m.pred_heads, c.parameters.1
    );
    let _ = writeln!(
        s,
        "    input: {{frames: {}, image_size: {}, tubelet: {}, patch: {}, fps: {}, frame_step: {}}}",
        m.frames, m.image_size, m.tubelet, m.patch, c.config.data.fps, c.config.data.frame_step
    );
    if let Some(corpus) = &c.corpus {
        let _ = writeln!(s, "  corpus:");
        let _ = writeln!(s, "    manifest_blake3: {}", y(&corpus.manifest_blake3));
        let _ = writeln!(s, "    shards: {}", corpus.shards);
        let _ = writeln!(s, "    clips: {}", corpus.clips);
    }
    let _ = writeln!(s, "  contributors:");
    if c.contributors.is_empty() {
        let _ = writeln!(s, "    []");
    }
    for k in &c.contributors {
        let _ = writeln!(
            s,
            "    - {{name: {}, samples: {}, steps: {}, updates: {}, rejected: {}, held_out_score: {}}}",
            y(&k.name),
            k.samples,
            k.steps,
            k.updates,
            k.rejected,
            k.score.map_or("null".to_owned(), |v| format!("{v:.5}"))
        );
    }
    let _ = writeln!(s, "  evaluation:");
    if c.evaluation.is_empty() {
        let _ = writeln!(s, "    []");
    }
    for e in &c.evaluation {
        let random = e
            .random_init
            .map_or_else(|| "null".to_owned(), |r| format!("{r:.4}"));
        let _ = writeln!(
            s,
            "    - {{metric: {}, value: {:.4}, random_init: {random}, protocol: {}}}",
            y(&e.metric),
            e.value,
            y(&e.protocol)
        );
    }
    let _ = writeln!(s, "---");
}

/// The title and what the model is.
fn intro(c: &CardInfo, s: &mut String) {
    let m = &c.config.model;
    let grid = m.grid();
    let _ = writeln!(s);
    let _ = writeln!(s, "# {}", c.name);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "A V-JEPA video encoder (joint-embedding predictive architecture) pretrained with Amity, \
         {} and published by `{}`. It maps a clip of {} frames at \
         {}x{} pixels to {} tokens of width {} ({}x{}x{} tubelets of {}x{}x{} pixels). It was \
         trained to predict the representations of masked spatio-temporal blocks from the visible \
         ones, with an EMA target encoder against collapse; no pixels were reconstructed.",
        if c.contributors.is_empty() {
            "trained on one machine (no federation provenance recorded)".to_owned()
        } else {
            format!("federated across {} institution(s)", c.contributors.len())
        },
        c.publisher,
        m.frames,
        m.image_size,
        m.image_size,
        m.tokens(),
        m.width,
        grid.frames,
        grid.height,
        grid.width,
        m.tubelet,
        m.patch,
        m.patch
    );
    let _ = writeln!(s);
}

/// The files of a release.
fn files(_: &CardInfo, s: &mut String) {
    let _ = writeln!(s, "## Files");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "- `model.safetensors`: float32 tensors. `target_encoder.*` is the feature extractor \
         (the EMA encoder, as V-JEPA evaluates); `encoder.*` and `predictor.*` are the context \
         encoder and predictor (what the surprise detector uses). The run config is also in the \
         metadata key `amity.config`."
    );
    let _ = writeln!(
        s,
        "- `config.json`: the run's config (model shape and training recipe)."
    );
    let _ = writeln!(
        s,
        "- `manifest.json`, `manifest.sig`: every file's BLAKE3 and size, signed with Ed25519 \
         by the publisher. `amity fetch` checks both."
    );
    let _ = writeln!(s);
}

/// How and by whom it was trained.
fn training(c: &CardInfo, s: &mut String) {
    let t = &c.config.train;
    let _ = writeln!(s, "## Training");
    let _ = writeln!(s);
    let how = if c.contributors.is_empty() {
        format!(
            "One local AdamW run of {} steps of {} clips.",
            t.steps, t.batch
        )
    } else {
        format!(
            "{} rounds of DiLoCo-style federated training (local AdamW, outer Nesterov step), {} \
             clips seen in all.",
            c.round,
            c.samples_seen()
        )
    };
    let _ = writeln!(
        s,
        "{how} Inner recipe: peak learning rate {}, weight decay {} -> {}, EMA \
         {} -> {}, {} mask set(s), seed {}.",
        t.lr,
        t.weight_decay,
        t.weight_decay_end,
        t.ema_start,
        t.ema_end,
        t.masks.len(),
        t.seed
    );
    if let Some(corpus) = &c.corpus {
        let _ = writeln!(
            s,
            "Corpus: {} clips in {} content-addressed shards; corpus manifest BLAKE3 `{}`.",
            corpus.clips, corpus.shards, corpus.manifest_blake3
        );
    }
    let _ = writeln!(s);
    if !c.contributors.is_empty() {
        let _ = writeln!(
            s,
            "| institution | clips | local steps | updates accepted | rejected | held-out loss change |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: |");
        for k in &c.contributors {
            let score = k
                .score
                .map_or("-".to_owned(), |v| format!("{:+.2}%", 100.0 * v));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {score} |",
                k.name, k.samples, k.steps, k.updates, k.rejected
            );
        }
        let _ = writeln!(
            s,
            "\nThe last column is the mean change of the coordinator's held-out loss that the \
             institution's updates caused when applied alone (contribution scoring; negative \
             helps)."
        );
        let _ = writeln!(s);
    }
}

/// How it scores, against random initialisation.
fn evaluation(c: &CardInfo, s: &mut String) {
    let _ = writeln!(s, "## Evaluation");
    let _ = writeln!(s);
    if c.evaluation.is_empty() {
        let _ = writeln!(s, "No evaluation was run for this release.");
    } else {
        let _ = writeln!(s, "| metric | this model | random init | protocol |");
        let _ = writeln!(s, "| --- | ---: | ---: | --- |");
        for e in &c.evaluation {
            let random = e
                .random_init
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
            let _ = writeln!(
                s,
                "| {} | {:.3} | {random} | {} |",
                e.metric, e.value, e.protocol
            );
        }
    }
    if !c.not_measured.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "Not measured for this release: {}.",
            c.not_measured.join(", ")
        );
    }
    let _ = writeln!(s);
}

/// How to fetch and use it, and its licence.
fn usage(c: &CardInfo, s: &mut String) {
    let _ = writeln!(s, "## Use");
    let _ = writeln!(s);
    let _ = writeln!(s, "```sh");
    let _ = writeln!(
        s,
        "amity fetch <coordinator-address or mirror folder> {} --out {} --key <publisher key>",
        c.name, c.name
    );
    let _ = writeln!(
        s,
        "amity embed video.mp4 --release {} --out features.npy",
        c.name
    );
    let _ = writeln!(s, "```");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "From Python: `safetensors.numpy.load_file(\"model.safetensors\")` gives every tensor \
         by name (see Amity's `docs/pytorch.md`)."
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "## Licence");
    let _ = writeln!(s);
    let _ = writeln!(s, "{}", c.licence);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_front_matter_names_everything() {
        let info = CardInfo {
            name: "v1".into(),
            publisher: "coord".into(),
            config: Config::preset("tiny").unwrap(),
            round: 5,
            params: Some("ab".repeat(32)),
            parameters: (1000, 200),
            corpus: Some(CorpusInfo {
                manifest_blake3: "cd".repeat(32),
                shards: 16,
                clips: 640,
            }),
            contributors: vec![Contributor {
                name: "uni \"a\"".into(),
                samples: 100,
                steps: 10,
                updates: 5,
                rejected: 1,
                score: Some(-0.031),
            }],
            evaluation: vec![EvalResult {
                metric: "velocity_r2".into(),
                value: 0.25,
                random_init: Some(0.01),
                protocol: "ridge probe".into(),
            }],
            not_measured: vec!["planning success".into()],
            licence: "Apache-2.0".into(),
        };
        let card = render(&info);
        let front = card.split("---").nth(1).unwrap();
        for needle in [
            "samples_seen: 100",
            "rounds: 5",
            "shards: 16",
            "\"uni \\\"a\\\"\"",
            "velocity_r2",
            "random_init: 0.0100",
            "license: apache-2.0",
        ] {
            assert!(front.contains(needle), "{needle} in\n{front}");
        }
        assert!(card.contains("Not measured for this release: planning success."));
    }
}
