//! [`Entries`]: an update as its codec carried it, before densifying.

/// An update of [`Entries::len`] values as sent: per part, every value (a dense part) or the
/// kept values and their indices (a sparse part). Reading an update this way costs what was sent,
/// not its length: the coordinator aggregates thousands of top-k updates by visiting only their
/// kept values ([`Entries::for_each`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Entries {
    len: usize,
    parts: Vec<Part>,
}

/// One part: `values` at `start + indices[i]`, or at `start + i` when dense.
#[derive(Debug, Clone, PartialEq)]
struct Part {
    start: usize,
    indices: Option<Vec<u32>>,
    values: Vec<f32>,
}

impl Entries {
    /// No values yet.
    pub fn new() -> Self {
        Entries::default()
    }

    /// Every value of `values`, as one dense part.
    pub fn dense(values: Vec<f32>) -> Self {
        let mut e = Entries::new();
        e.push_part(values.len(), None, values);
        e
    }

    /// Appends a part of `len` values: `kept` at `indices` (ascending, each below `len`, as
    /// many as `kept`), or every value when `indices` is `None` (then `kept` has `len` values).
    pub(super) fn push_part(&mut self, len: usize, indices: Option<Vec<u32>>, kept: Vec<f32>) {
        debug_assert!(match &indices {
            Some(i) => i.len() == kept.len() && i.last().is_none_or(|&l| (l as usize) < len),
            None => kept.len() == len,
        });
        self.parts.push(Part {
            start: self.len,
            indices,
            values: kept,
        });
        self.len += len;
    }

    /// The update's length (values sent or not).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the update has no values at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many values were sent.
    pub fn kept(&self) -> usize {
        self.parts.iter().map(|p| p.values.len()).sum()
    }

    /// Calls `f(index, value)` for every value sent, in ascending index order; the values not
    /// sent are zero.
    #[inline]
    pub fn for_each(&self, mut f: impl FnMut(usize, f32)) {
        for p in &self.parts {
            match &p.indices {
                Some(indices) => {
                    for (&i, &v) in indices.iter().zip(&p.values) {
                        f(p.start + i as usize, v);
                    }
                }
                None => {
                    for (i, &v) in p.values.iter().enumerate() {
                        f(p.start + i, v);
                    }
                }
            }
        }
    }

    /// The values sent, in order (without their indices).
    pub fn values(&self) -> impl Iterator<Item = f32> + '_ {
        self.parts.iter().flat_map(|p| p.values.iter().copied())
    }

    /// The whole update, zeros where nothing was sent.
    pub fn to_dense(&self) -> Vec<f32> {
        if let [p] = self.parts.as_slice()
            && p.indices.is_none()
        {
            return p.values.clone();
        }
        let mut dense = vec![0.0f32; self.len];
        self.for_each(|i, v| dense[i] = v);
        dense
    }

    /// The values of a dense update, to change in place (`None` when any part is sparse).
    pub fn dense_values_mut(&mut self) -> Option<&mut [f32]> {
        match self.parts.as_mut_slice() {
            [p] if p.indices.is_none() => Some(&mut p.values),
            [] => Some(&mut []),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CodecSpec, decode_parts, decode_parts_entries, encode_parts};
    use super::*;

    #[test]
    fn entries_visit_what_was_sent_and_densify_like_decode() {
        let values: Vec<f32> = (0..9000)
            .map(|i| ((i * 7919) % 1000) as f32 - 500.0)
            .collect();
        let parts = [5000, 4000];
        for spec in ["fp32", "sparseloco", "topk0.01+int8"] {
            let spec: CodecSpec = spec.parse().unwrap();
            let bytes = encode_parts(&spec, &values, &parts);
            let e = decode_parts_entries(&bytes, &parts).unwrap();
            let dense = decode_parts(&bytes, &parts).unwrap();
            assert_eq!(e.len(), 9000);
            assert_eq!(e.to_dense(), dense, "{spec}");
            let mut seen = Vec::new();
            e.for_each(|i, v| seen.push((i, v)));
            assert_eq!(seen.len(), e.kept());
            assert!(
                seen.windows(2).all(|w| w[0].0 < w[1].0),
                "{spec}: ascending"
            );
            assert!(seen.iter().all(|&(i, v)| dense[i] == v));
            let sum: f64 = e.values().map(f64::from).sum();
            let dense_sum: f64 = dense.iter().map(|&v| f64::from(v)).sum();
            assert_eq!(sum, dense_sum, "{spec}: the unsent values are zeros");
        }
    }

    #[test]
    fn only_a_dense_update_changes_in_place() {
        let mut d = Entries::dense(vec![1.0, 2.0]);
        d.dense_values_mut().unwrap()[1] = 5.0;
        assert_eq!(d.to_dense(), vec![1.0, 5.0]);
        let spec: CodecSpec = "topk0.5+fp32".parse().unwrap();
        let bytes = encode_parts(&spec, &[1.0, 0.0, 3.0, 0.0], &[4]);
        let mut s = decode_parts_entries(&bytes, &[4]).unwrap();
        assert!(s.dense_values_mut().is_none());
        assert_eq!(s.to_dense(), vec![1.0, 0.0, 3.0, 0.0]);
    }
}
