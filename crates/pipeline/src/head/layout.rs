//! The layer arithmetic of a ring: checking a layout, and spreading layers over the nodes
//! left after a loss.

use std::net::SocketAddr;
use std::ops::Range;

use shoal_engine::ModelConfig;

use crate::error::{PipelineError, Result};

use super::{PeerStage, PipelineConfig};

/// The head and the peers left, each keeping its share of the old plan.
pub(super) fn proportional(
    head: Range<usize>,
    alive: &[PeerStage],
    n_layers: usize,
) -> Result<(Range<usize>, Vec<PeerStage>)> {
    let shares: Vec<usize> = std::iter::once(head.len())
        .chain(alive.iter().map(|p| p.layers.len()))
        .collect();
    let ranges = redistribute(&shares, n_layers);
    let Some((local, rest)) = ranges.split_first() else {
        return Err(PipelineError::Config(
            "no stage left to run the model".into(),
        ));
    };
    let peers = alive
        .iter()
        .zip(rest)
        .map(|(p, layers)| PeerStage {
            addr: p.addr,
            layers: layers.clone(),
        })
        .collect();
    Ok((local.clone(), peers))
}

/// Whether a re-plan's layout can be built: the head from layer 0, then the peers, each a
/// non-empty range following the last, ending at the model's last layer, none of them one
/// of the `lost` and none twice.
pub(super) fn check_layout(
    local: &Range<usize>,
    peers: &[PeerStage],
    lost: &[SocketAddr],
    n_layers: usize,
) -> std::result::Result<(), String> {
    for (i, p) in peers.iter().enumerate() {
        if lost.contains(&p.addr) {
            return Err(format!("{} was just lost", p.addr));
        }
        if peers[..i].iter().any(|q| q.addr == p.addr) {
            return Err(format!("{} has two stages", p.addr));
        }
    }
    let layers = std::iter::once(local).chain(peers.iter().map(|p| &p.layers));
    shoal_cluster::check_tiling(layers, n_layers).map_err(|e| format!("the layout: {e}"))
}

/// Splits `n_layers` into consecutive ranges in proportion to `shares` (largest remainder),
/// every range at least one layer; stages beyond the number of layers get none and are
/// left out.
pub(super) fn redistribute(shares: &[usize], n_layers: usize) -> Vec<Range<usize>> {
    let n_stages = shares.len().min(n_layers);
    if n_stages == 0 {
        return Vec::new();
    }
    let weights: Vec<usize> = shares[..n_stages].iter().map(|&s| s.max(1)).collect();
    let total: usize = weights.iter().sum();
    // Each its share rounded down, at least one layer (taken back from the largest)...
    let mut sizes: Vec<usize> = weights
        .iter()
        .map(|&w| (n_layers * w / total).max(1))
        .collect();
    while sizes.iter().sum::<usize>() > n_layers {
        let largest = (0..n_stages).max_by_key(|&i| (sizes[i], i)).unwrap_or(0);
        sizes[largest] -= 1;
    }
    // ...and the layers left over to the largest remainders.
    let assigned: usize = sizes.iter().sum();
    let mut order: Vec<usize> = (0..n_stages).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(n_layers * weights[i] % total), i));
    for &i in order.iter().cycle().take(n_layers - assigned) {
        sizes[i] += 1;
    }
    let mut start = 0;
    sizes
        .into_iter()
        .map(|size| {
            let r = start..start + size;
            start += size;
            r
        })
        .collect()
}

/// Checks that the head's layers and the peers' tile the model in order (stage 0 is the
/// head, stage `i` the `i`-th peer).
pub(super) fn check_ring(config: &PipelineConfig, model: &ModelConfig) -> Result<()> {
    let layers =
        std::iter::once(&config.local_layers).chain(config.peers.iter().map(|p| &p.layers));
    shoal_cluster::check_tiling(layers, model.n_layers)
        .map_err(|e| PipelineError::Config(format!("the ring: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(ranges: &[Range<usize>]) -> Vec<usize> {
        ranges.iter().map(|r| r.len()).collect()
    }

    #[test]
    fn a_layout_must_tile_the_model_with_nodes_left() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let gone: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let stage = |addr, layers| PeerStage { addr, layers };
        let ok =
            |local: Range<usize>, peers: &[PeerStage]| check_layout(&local, peers, &[gone], 30);
        assert_eq!(ok(0..30, &[]), Ok(()));
        assert_eq!(ok(0..4, &[stage(b, 4..30)]), Ok(()));
        assert_eq!(ok(0..4, &[stage(b, 4..9), stage(a, 9..30)]), Ok(()));
        assert!(ok(1..30, &[]).is_err(), "the head embeds: it starts at 0");
        assert!(
            ok(0..0, &[stage(a, 0..30)]).is_err(),
            "the head runs a layer"
        );
        assert!(ok(0..29, &[]).is_err(), "a layer left out");
        assert!(ok(0..4, &[stage(a, 5..30)]).is_err(), "a gap");
        assert!(ok(0..4, &[stage(a, 3..30)]).is_err(), "an overlap");
        assert!(ok(0..4, &[stage(gone, 4..30)]).is_err(), "a node just lost");
        assert!(
            ok(0..4, &[stage(a, 4..8), stage(a, 8..30)]).is_err(),
            "a node twice"
        );
        assert!(
            ok(0..4, &[stage(a, 4..4), stage(b, 4..30)]).is_err(),
            "an empty stage"
        );
    }

    #[test]
    fn redistribute_keeps_proportions_and_tiles_the_model() {
        assert_eq!(redistribute(&[10, 10], 30), vec![0..15, 15..30]);
        assert_eq!(sizes(&redistribute(&[20, 5], 30)), vec![24, 6]);
        assert_eq!(redistribute(&[7], 30), vec![0..30]);
        assert_eq!(sizes(&redistribute(&[1, 1, 1], 2)), vec![1, 1]);
        assert!(redistribute(&[], 30).is_empty());
        for shares in [vec![3, 9, 1], vec![0, 0, 5], vec![1, 2, 3, 4, 5]] {
            for n in [1usize, 5, 24, 30] {
                let r = redistribute(&shares, n);
                assert_eq!(r.first().map(|r| r.start), Some(0));
                assert_eq!(r.last().map(|r| r.end), Some(n));
                assert!(r.windows(2).all(|w| w[0].end == w[1].start));
                assert!(r.iter().all(|r| !r.is_empty()));
            }
        }
    }
}
