//! Amity's bundled planner and surprise detector.
//!
//! An action-conditioned predictor on a frozen released encoder is a world model; model-predictive
//! control (CEM, MPPI) searches action sequences whose predicted latent reaches a goal image's
//! latent under hard guardrail costs. The same predictor's error over a sliding window flags
//! physically impossible events in a video.
