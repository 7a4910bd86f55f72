//! [`Pooler`]: a text's embedding from its hidden states, as llama.cpp pools them.

use crate::config::Pooling;

/// Pools the hidden states after the final norm of one text, row by row in the text's
/// order, into its embedding: the mean of every row, or the first or the last row alone
/// ([`Pooling`]), then scaled to unit length (as llama-server's `/v1/embeddings` and
/// Ollama's `/api/embed` give them). Sums are kept in `f64`, so the result does not depend
/// on how the rows were split into chunks — a whole model and a ring of stages, which see
/// the rows in different pieces, pool to the same vector.
#[derive(Clone, Debug)]
pub struct Pooler {
    pooling: Pooling,
    /// The pooled rows so far: all of them summed, or the first or the last alone.
    sums: Vec<f64>,
    rows: usize,
}

impl Pooler {
    /// A pooler for rows of `hidden` values.
    pub fn new(pooling: Pooling, hidden: usize) -> Self {
        Pooler {
            pooling,
            sums: vec![0.0; hidden],
            rows: 0,
        }
    }

    /// Takes the text's next row (`hidden` values; extra values are ignored, missing
    /// ones count as 0).
    pub fn push(&mut self, row: &[f32]) {
        let take = match self.pooling {
            Pooling::Mean => true,
            Pooling::First => self.rows == 0,
            Pooling::Last => {
                self.sums.iter_mut().for_each(|s| *s = 0.0);
                true
            }
        };
        if take {
            for (sum, &v) in self.sums.iter_mut().zip(row) {
                *sum += f64::from(v);
            }
        }
        self.rows += 1;
    }

    /// The embedding: the pooled rows at unit length (a zero vector stays zero).
    pub fn finish(self) -> Vec<f32> {
        let n = match self.pooling {
            Pooling::Mean => self.rows.max(1) as f64,
            Pooling::First | Pooling::Last => 1.0,
        };
        let norm = self
            .sums
            .iter()
            .map(|s| (s / n) * (s / n))
            .sum::<f64>()
            .sqrt();
        let scale = if norm > 0.0 { 1.0 / (n * norm) } else { 0.0 };
        self.sums.iter().map(|s| (s * scale) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooled(pooling: Pooling, rows: &[[f32; 2]]) -> Vec<f32> {
        let mut p = Pooler::new(pooling, 2);
        rows.iter().for_each(|r| p.push(r));
        p.finish()
    }

    #[test]
    fn mean_first_and_last_at_unit_length() {
        let rows = [[3.0, 0.0], [0.0, 4.0], [1.0, 1.0]];
        let s = 0.5f32.sqrt();
        // Mean (4/3, 5/3), scaled to unit length: (4, 5) / sqrt(41).
        let d = 41f32.sqrt();
        let mean = pooled(Pooling::Mean, &rows);
        assert!((mean[0] - 4.0 / d).abs() < 1e-6 && (mean[1] - 5.0 / d).abs() < 1e-6);
        assert_eq!(pooled(Pooling::First, &rows), vec![1.0, 0.0]);
        let last = pooled(Pooling::Last, &rows);
        assert!((last[0] - s).abs() < 1e-6 && (last[1] - s).abs() < 1e-6);
        assert_eq!(pooled(Pooling::Mean, &[[0.0, 0.0]]), vec![0.0, 0.0]);
    }
}
