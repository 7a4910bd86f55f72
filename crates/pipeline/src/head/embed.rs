//! Embeddings through the ring: a text runs down the ring as a prompt does, in the chunks a
//! whole model embeds in; the last stage sends back the hidden states after the final norm
//! (`Want::Normed`, protocol 11; only the first row for CLS pooling, protocol 12) and the
//! head pools them as a whole model would
//! ([`Pooler`]), so a node heading a ring answers `/v1/embeddings` with the vector one
//! device would give.

use std::collections::VecDeque;

use shoal_engine::generate::PREFILL_CHUNK;
use shoal_engine::{EngineError, Logits, Pooler, Pooling};
use shoal_wire::{Activations, EndSession, Forward, LogitRows, Message, Payload, Want};
use tokio::sync::mpsc;

use super::{
    chunk_ends, send_first, to_u32, unasked_draws, Drawn, LocalOut, Pipeline, Reply, Ring,
};
use crate::error::{PipelineError, Result};

impl Pipeline {
    /// An embedding of `tokens`: pooled as [`crate::PipelineConfig::pooling`] or the model
    /// file says, at unit length — with f32 activations (the default) the very vector
    /// `shoal_engine::Model::embed` gives on one device. Runs as a session of its own, so no
    /// generation's cache is touched (a caller that stops waiting drops the future, which
    /// ends the session on every stage). A stage lost on the way is replaced as for a
    /// generation, and the text run again on the new ring.
    pub async fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(PipelineError::InvalidRequest("nothing to embed".into()));
        }
        let limit = self.model.context_length;
        if tokens.len() > limit {
            return Err(EngineError::ContextFull {
                needed: tokens.len(),
                limit,
            }
            .into());
        }
        let pooling = self.config.pooling.unwrap_or(self.model.pooling);
        let mut recoveries = 0;
        loop {
            let ring = self.current_ring();
            match self.embed_on(&ring, tokens, pooling).await {
                Err(e) if self.recoverable(&e, &ring, recoveries) => {
                    recoveries += 1;
                    tracing::warn!(error = %e, "lost a stage mid-embedding; re-planning and running it again");
                    self.recover(&ring).await?;
                }
                result => return result,
            }
        }
    }

    /// One attempt at an embedding, on `ring`, as a session of its own.
    async fn embed_on(&self, ring: &Ring, tokens: &[u32], pooling: Pooling) -> Result<Vec<f32>> {
        let (guard, mut rx) = self.open_session(ring);
        let result = self
            .pool_rows(ring, guard.id, &mut rx, tokens, pooling)
            .await;
        let ends = vec![EndSession::free(guard.id)];
        guard.end(ends).await;
        result
    }

    /// Sends the chunks down the ring (the head's stage runs the next while the peers run
    /// this one), asking the last stage for the rows `pooling` needs — every row for the
    /// mean, the first chunk's first row, the last row of the last chunk — and pools
    /// them in order, at most [`ROWS_IN_FLIGHT`] chunks behind the one sent: a long text
    /// holds a few chunks' rows at a time, not all of them (and under the mean, a stage's
    /// error is seen within a few chunks).
    async fn pool_rows(
        &self,
        ring: &Ring,
        session_id: u64,
        rx: &mut mpsc::UnboundedReceiver<Reply>,
        tokens: &[u32],
        pooling: Pooling,
    ) -> Result<Vec<f32>> {
        let hidden = self.model.hidden;
        let alone = ring.peers.is_empty();
        let mut pooler = Pooler::new(pooling, hidden);
        let mut cache = Some(ring.stage.new_cache());
        let pieces = chunk_ends(0, tokens.len(), PREFILL_CHUNK);
        let n_chunks = pieces.len();
        // The steps whose rows the last stage sends back and are not pooled yet, and how
        // many rows each.
        let mut asked = VecDeque::new();
        let mut start = 0;
        for (i, end) in pieces.into_iter().enumerate() {
            let rows = match pooling {
                Pooling::Mean => Some(LogitRows::All),
                Pooling::First => (i == 0).then_some(LogitRows::First),
                Pooling::Last => (i + 1 == n_chunks).then_some(LogitRows::Last),
            };
            let positions: Vec<u32> = (start..end).map(to_u32).collect::<Result<_>>()?;
            // A head alone holds the final norm itself.
            let logits = if alone { Logits::Normed } else { Logits::Last };
            let piece = tokens[start..end].to_vec();
            let out = self
                .run_local(session_id, ring, &mut cache, piece, &positions, logits)
                .await?;
            let LocalOut::Hidden(a) = out else {
                return Err(PipelineError::Task(
                    "the head's stage computed logits for an embedding".into(),
                ));
            };
            if alone {
                if rows.is_some() {
                    push_rows(&mut pooler, &a, a.rows() as usize, hidden)?;
                }
            } else {
                let seq = i as u64;
                let msg = Message::Forward(Forward {
                    session_id,
                    seq,
                    plan_id: ring.plan_id,
                    positions,
                    payload: Payload::Hidden(a),
                    want: rows.map_or(Want::Nothing, |rows| Want::Normed { rows }),
                    reply_to: self.reply_addr,
                    resume: None,
                });
                send_first(ring, msg).await?;
                if let Some(rows) = rows {
                    let expected = match rows {
                        LogitRows::All => end - start,
                        LogitRows::Last | LogitRows::First => 1,
                    };
                    asked.push_back((seq, expected));
                }
            }
            start = end;
            while asked.len() > ROWS_IN_FLIGHT {
                if let Some((seq, expected)) = asked.pop_front() {
                    self.pool_reply(rx, seq, expected, &mut pooler).await?;
                }
            }
        }
        while let Some((seq, expected)) = asked.pop_front() {
            self.pool_reply(rx, seq, expected, &mut pooler).await?;
        }
        Ok(pooler.finish())
    }

    /// Waits for the rows of step `seq` and pools them. One session's steps run in order on
    /// every stage and its replies come back over one link, so they arrive in `seq` order
    /// (rows out of order — a link dialled again mid-text — are dropped as stale, the wait
    /// times out as for a lost stage, and the text is run again: never pooled wrong).
    async fn pool_reply(
        &self,
        rx: &mut mpsc::UnboundedReceiver<Reply>,
        seq: u64,
        expected: usize,
        pooler: &mut Pooler,
    ) -> Result<()> {
        match self.wait_reply(rx, seq).await? {
            Drawn::Rows(a) => push_rows(pooler, &a, expected, self.model.hidden),
            Drawn::Token(..) | Drawn::Verified(_) => Err(unasked_draws()),
        }
    }
}

/// Chunks whose rows may be on their way back while the head sends the next.
const ROWS_IN_FLIGHT: usize = 2;

/// Pools `a`'s rows, which must be `rows` rows of `hidden` values: a last stage that sends
/// another shape is not answering this embedding.
fn push_rows(pooler: &mut Pooler, a: &Activations, rows: usize, hidden: usize) -> Result<()> {
    if a.rows() as usize != rows || a.cols() as usize != hidden {
        return Err(PipelineError::StageFailed(format!(
            "the last stage sent {} rows of {} values for an embedding step of {rows} rows of \
             {hidden}",
            a.rows(),
            a.cols()
        )));
    }
    for row in a.to_f32().chunks_exact(hidden.max(1)) {
        pooler.push(row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_wire::DType;

    #[test]
    fn rows_of_another_shape_are_not_pooled() {
        let mut pooler = Pooler::new(Pooling::Mean, 2);
        let rows = Activations::from_f32(2, 2, &[1.0, 0.0, 0.0, 1.0], DType::F32).unwrap();
        push_rows(&mut pooler, &rows, 2, 2).unwrap();
        for (count, hidden) in [(3, 2), (1, 2), (2, 3)] {
            let err = push_rows(&mut pooler, &rows, count, hidden).unwrap_err();
            assert!(
                err.to_string().contains("the last stage sent 2 rows of 2"),
                "{err}"
            );
        }
        let s = 0.5f32.sqrt();
        assert_eq!(
            pooler.finish(),
            vec![s, s],
            "only the rows of the right shape"
        );
    }
}
