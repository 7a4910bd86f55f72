//! The model for the room (`--model auto`, issue #15): the largest known model that the
//! members of a cluster can hold together, by the same rule one device uses
//! ([`crate::hardware::Hardware::recommend`]): the file plus room for its cache must fit in
//! the share of free memory a device gives. Whether the ring is fast enough is the
//! pipeline planner's call, made with measured speeds once a model is picked here.

use serde::Serialize;

use crate::hardware::{OVERHEAD, RUNNABLE_ARCHITECTURES, SHARE_OF_AVAILABLE};
use crate::{ModelInfo, REGISTRY};

/// Free memory, summed over the members, a model needs: its file and cache, over the
/// share of free memory each device gives.
pub fn memory_needed(model: &ModelInfo) -> u64 {
    (model.size as f64 * (1.0 + OVERHEAD) / SHARE_OF_AVAILABLE).ceil() as u64
}

/// The known models the engine runs, largest first.
pub fn runnable() -> Vec<&'static ModelInfo> {
    let mut models: Vec<&'static ModelInfo> = REGISTRY
        .iter()
        .copied()
        .filter(|m| RUNNABLE_ARCHITECTURES.contains(&m.arch))
        .collect();
    models.sort_by_key(|m| std::cmp::Reverse(m.size));
    models
}

/// The runnable models that members with `free` bytes of free memory each can hold
/// together, largest first (empty when not even the smallest fits).
pub fn models_for_room(free: &[u64]) -> Vec<&'static ModelInfo> {
    let total: u64 = free.iter().fold(0, |sum, f| sum.saturating_add(*f));
    runnable()
        .into_iter()
        .filter(|m| memory_needed(m) <= total)
        .collect()
}

/// What a cluster of `devices` alike devices would run (a row of `shoal models room`).
#[derive(Debug, Clone, Serialize)]
pub struct RoomRow {
    pub devices: usize,
    /// Free memory of them all.
    pub free_bytes: u64,
    /// The model chosen, by short name; `None` when none fits.
    pub model: Option<&'static str>,
    /// Its file size.
    pub size_bytes: u64,
    /// Free memory it needs ([`memory_needed`]).
    pub needs_bytes: u64,
}

/// What 1 to `up_to` devices with `free_each` bytes free each would run.
pub fn room_table(free_each: u64, up_to: usize) -> Vec<RoomRow> {
    (1..=up_to.max(1))
        .map(|devices| {
            let free = vec![free_each; devices];
            let pick = models_for_room(&free).first().copied();
            RoomRow {
                devices,
                free_bytes: free_each.saturating_mul(devices as u64),
                model: pick.map(|m| m.name),
                size_bytes: pick.map_or(0, |m| m.size),
                needs_bytes: pick.map_or(0, memory_needed),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::{QWEN05, QWEN15, SMOLLM2};

    #[test]
    fn a_bigger_room_holds_a_bigger_model() {
        assert!(models_for_room(&[10 << 20]).is_empty());
        let one = models_for_room(&[400 << 20]);
        assert_eq!(one.first().map(|m| m.name), Some("smollm2"));
        // Neither device alone holds Qwen 0.5B, both together do.
        let half = memory_needed(&QWEN05) / 2 + 1;
        assert_eq!(models_for_room(&[half])[0].name, "smollm2");
        assert_eq!(models_for_room(&[half, half])[0].name, "qwen05");
        let big: Vec<&str> = models_for_room(&[1 << 30, 1 << 30, 1 << 30])
            .iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(big, ["qwen15", "qwen05", "smollm2"]);
    }

    #[test]
    fn one_device_gets_what_its_recommendation_says() {
        let hw = |available| crate::hardware::Hardware {
            memory: crate::hardware::Memory {
                total_bytes: Some(available),
                available_bytes: Some(available),
            },
            ..crate::hardware::Hardware::detect()
        };
        for free in [200u64 << 20, 1 << 30, 3 << 30, 64 << 30] {
            assert_eq!(
                models_for_room(&[free])[0].name,
                hw(free).recommend().model,
                "{free} bytes free"
            );
        }
    }

    #[test]
    fn the_table_grows_with_the_devices() {
        let each = memory_needed(&QWEN15) / 3 + 1;
        let rows = room_table(each, 4);
        let models: Vec<Option<&str>> = rows.iter().map(|r| r.model).collect();
        assert_eq!(
            models,
            [
                Some("smollm2"),
                Some("qwen05"),
                Some("qwen15"),
                Some("qwen15")
            ]
        );
        assert_eq!(rows[2].needs_bytes, memory_needed(&QWEN15));
        assert_eq!(rows[0].size_bytes, SMOLLM2.size);
        assert!(rows.iter().all(|r| r.free_bytes == each * r.devices as u64));
    }
}
