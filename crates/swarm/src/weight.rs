//! An agent's weight: how much the head trusts it to answer well and in time (issue #5,
//! item 4).
//!
//! ```text
//! weight = speed_weight × thermal_penalty
//! speed_weight    = min(tokens/s ÷ 40, 1)            (0 for a non-finite or negative speed)
//! thermal_penalty = 1.0                               hottest zone ≤ 70 °C (or no zones)
//!                   1.0 − 0.5 × (t − 70) ÷ 20         70 °C < t < 90 °C
//!                   0.5                               t ≥ 90 °C
//! ```
//!
//! 40 tokens/s is fast enough that a whole answer arrives within the timeouts, so faster
//! agents gain nothing more. A hot device is about to throttle, so it is trusted less, but
//! never below half: it still answers.

use std::fs;
use std::path::Path;

/// Tokens per second at which an agent's speed weight reaches 1.
pub const FULL_SPEED_TOKENS_PER_S: f32 = 40.0;

/// Up to this temperature (°C) of the hottest thermal zone there is no penalty.
pub const THERMAL_PENALTY_START_C: f32 = 70.0;

/// From this temperature (°C) on the penalty is at its floor, [`THERMAL_PENALTY_FLOOR`].
pub const THERMAL_PENALTY_FULL_C: f32 = 90.0;

/// The smallest thermal penalty factor.
pub const THERMAL_PENALTY_FLOOR: f32 = 0.5;

/// Where Linux lists thermal zones.
const THERMAL_ZONES_DIR: &str = "/sys/class/thermal";

/// `min(tokens_per_s / 40, 1)`; 0 for a non-finite or negative speed.
pub fn speed_weight(tokens_per_s: f32) -> f32 {
    if !tokens_per_s.is_finite() || tokens_per_s < 0.0 {
        return 0.0;
    }
    (tokens_per_s / FULL_SPEED_TOKENS_PER_S).min(1.0)
}

/// The penalty factor for a hottest-zone temperature in °C: 1.0 up to 70 °C, linear down to
/// 0.5 at 90 °C and above. A non-finite temperature gives 1.0 (nothing known).
pub fn penalty_for_temperature(celsius: f32) -> f32 {
    if !celsius.is_finite() || celsius <= THERMAL_PENALTY_START_C {
        return 1.0;
    }
    if celsius >= THERMAL_PENALTY_FULL_C {
        return THERMAL_PENALTY_FLOOR;
    }
    let fraction =
        (celsius - THERMAL_PENALTY_START_C) / (THERMAL_PENALTY_FULL_C - THERMAL_PENALTY_START_C);
    1.0 - (1.0 - THERMAL_PENALTY_FLOOR) * fraction
}

/// The thermal penalty of this device, from `/sys/class/thermal/thermal_zone*/temp`; 1.0
/// where there are none (e.g. not Linux, a container without sysfs).
pub fn thermal_penalty() -> f32 {
    thermal_penalty_in(Path::new(THERMAL_ZONES_DIR))
}

/// The thermal penalty from the `thermal_zone*/temp` files under `dir` (millidegrees
/// Celsius, as Linux writes them); the hottest readable zone counts. 1.0 when the directory
/// or every zone is missing or unreadable.
pub fn thermal_penalty_in(dir: &Path) -> f32 {
    match hottest_zone_celsius(dir) {
        Some(celsius) => penalty_for_temperature(celsius),
        None => 1.0,
    }
}

/// The highest temperature (°C) among the readable `thermal_zone*/temp` files under `dir`.
fn hottest_zone_celsius(dir: &Path) -> Option<f32> {
    let entries = fs::read_dir(dir).ok()?;
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("thermal_zone")
        })
        .filter_map(|entry| fs::read_to_string(entry.path().join("temp")).ok())
        .filter_map(|text| text.trim().parse::<i64>().ok())
        // Some drivers report errors as huge negative values; a zone below −50 °C is broken.
        .filter(|&millidegrees| millidegrees > -50_000)
        .map(|millidegrees| millidegrees as f32 / 1000.0)
        .max_by(f32::total_cmp)
}

/// An agent's weight: [`speed_weight`] × `thermal` (a factor from [`thermal_penalty`]).
/// A non-finite or negative `thermal` counts as 1.0 (nothing known); above 1.0 is capped.
pub fn agent_weight(tokens_per_s: f32, thermal: f32) -> f32 {
    let thermal = if thermal.is_finite() && thermal >= 0.0 {
        thermal.min(1.0)
    } else {
        1.0
    };
    speed_weight(tokens_per_s) * thermal
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    /// A fresh empty directory under the system temp dir, removed on drop.
    struct ScratchDir(std::path::PathBuf);

    impl ScratchDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("shoal-swarm-weight-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            ScratchDir(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn zone(dir: &Path, name: &str, content: &str) {
        let zone = dir.join(name);
        fs::create_dir_all(&zone).unwrap();
        fs::write(zone.join("temp"), content).unwrap();
    }

    #[test]
    fn speed_weight_caps_at_40_tokens_per_s() {
        assert!(close(speed_weight(0.0), 0.0));
        assert!(close(speed_weight(20.0), 0.5));
        assert!(close(speed_weight(40.0), 1.0));
        assert!(close(speed_weight(400.0), 1.0));
        assert_eq!(speed_weight(-1.0), 0.0);
        assert_eq!(speed_weight(f32::NAN), 0.0);
        assert_eq!(speed_weight(f32::INFINITY), 0.0);
    }

    #[test]
    fn penalty_is_linear_between_70_and_90() {
        assert_eq!(penalty_for_temperature(25.0), 1.0);
        assert_eq!(penalty_for_temperature(70.0), 1.0);
        assert!(close(penalty_for_temperature(80.0), 0.75));
        assert!(close(penalty_for_temperature(85.0), 0.625));
        assert_eq!(penalty_for_temperature(90.0), 0.5);
        assert_eq!(penalty_for_temperature(120.0), 0.5);
        assert_eq!(penalty_for_temperature(f32::NAN), 1.0);
    }

    #[test]
    fn hottest_zone_counts() {
        let dir = ScratchDir::new("hottest");
        zone(dir.path(), "thermal_zone0", "45000\n");
        zone(dir.path(), "thermal_zone1", "80000\n");
        zone(dir.path(), "thermal_zone2", "garbage\n");
        zone(dir.path(), "cooling_device0", "95000\n");
        assert!(close(thermal_penalty_in(dir.path()), 0.75));
    }

    #[test]
    fn cool_or_missing_zones_give_no_penalty() {
        let dir = ScratchDir::new("cool");
        assert_eq!(thermal_penalty_in(dir.path()), 1.0);
        assert_eq!(thermal_penalty_in(&dir.path().join("missing")), 1.0);
        zone(dir.path(), "thermal_zone0", "not a number");
        fs::create_dir_all(dir.path().join("thermal_zone1")).unwrap();
        assert_eq!(thermal_penalty_in(dir.path()), 1.0);
        zone(dir.path(), "thermal_zone2", "52000");
        assert_eq!(thermal_penalty_in(dir.path()), 1.0);
        zone(dir.path(), "thermal_zone3", "-2147483648");
        assert_eq!(thermal_penalty_in(dir.path()), 1.0);
        zone(dir.path(), "thermal_zone4", "95000");
        assert_eq!(thermal_penalty_in(dir.path()), 0.5);
    }

    #[test]
    fn this_device_has_a_valid_penalty() {
        let penalty = thermal_penalty();
        assert!((0.5..=1.0).contains(&penalty), "{penalty}");
    }

    #[test]
    fn weight_is_the_product() {
        assert!(close(agent_weight(20.0, 0.75), 0.375));
        assert!(close(agent_weight(80.0, 1.0), 1.0));
        assert!(close(agent_weight(40.0, f32::NAN), 1.0));
        assert!(close(agent_weight(40.0, 2.0), 1.0));
        assert_eq!(agent_weight(f32::NAN, 1.0), 0.0);
    }
}
