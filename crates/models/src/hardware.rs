//! What this device has — CPU, memory, GPUs, temperatures, battery — and which model of
//! the registry it should run (`shoal detect`; the MCP server's `hardware_info`).
//!
//! Everything is read from the operating system without extra tools: `/proc/cpuinfo` and
//! `/proc/meminfo`, `/sys/class/drm` (GPUs by PCI vendor), `/sys/class/thermal`,
//! `/sys/class/power_supply`; `nvidia-smi` adds NVIDIA names and memory where it is
//! installed, `sysctl` and `system_profiler` stand in on macOS. A value that cannot be read is
//! left out, not guessed. SIMD features are the CPU's own answer (runtime detection), the
//! same test the engine's kernels use to choose a path.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::registry::{ModelInfo, REGISTRY};

/// This device, as far as it can be read.
#[derive(Clone, Debug, Serialize)]
pub struct Hardware {
    pub os: &'static str,
    pub arch: &'static str,
    pub cpu: Cpu,
    pub memory: Memory,
    pub gpus: Vec<Gpu>,
    /// `(zone type, °C)` for each thermal zone that reads.
    pub thermal: Vec<Thermal>,
    pub battery: Option<Battery>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Cpu {
    pub model: Option<String>,
    /// Threads the OS schedules on (what the engine's kernels use).
    pub logical_cores: usize,
    pub physical_cores: Option<usize>,
    /// The SIMD extensions the engine can use here, as the CPU reports them.
    pub simd: Vec<&'static str>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Memory {
    pub total_bytes: Option<u64>,
    /// What can be taken without swapping (`MemAvailable`).
    pub available_bytes: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Gpu {
    pub vendor: String,
    pub name: Option<String>,
    pub memory_bytes: Option<u64>,
    /// Where it was seen: `drm`, `nvidia-smi`, `system_profiler`.
    pub source: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct Thermal {
    pub zone: String,
    pub celsius: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Battery {
    pub percent: Option<u8>,
    /// `Charging`, `Discharging`, `Full`, …
    pub status: Option<String>,
}

/// The model this device should run, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Recommendation {
    pub model: &'static str,
    pub file: &'static str,
    pub quantization: &'static str,
    pub size_bytes: u64,
    pub reason: String,
}

/// Memory a model needs beyond its file: KV cache, activations and the runtime, as a share
/// of the file (a short-context chat needs far less, a long one more).
pub(crate) const OVERHEAD: f64 = 0.5;
/// The architectures the engine runs (Gemma 3 is in the registry ahead of its support).
pub(crate) const RUNNABLE_ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "qwen3"];
/// The share of available memory a model may take, leaving the rest to the device's owner.
pub(crate) const SHARE_OF_AVAILABLE: f64 = 0.8;

impl Hardware {
    /// Reads this device. Never fails: what cannot be read is absent.
    pub fn detect() -> Self {
        Self {
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
            cpu: cpu(),
            memory: memory(),
            gpus: gpus(),
            thermal: thermal(Path::new("/sys/class/thermal")),
            battery: battery(Path::new("/sys/class/power_supply")),
        }
    }

    /// The largest registry model (chat models only) that fits in this device's available
    /// memory with room for its cache; the smallest when none fits.
    pub fn recommend(&self) -> Recommendation {
        recommend(self.memory.available_bytes)
    }
}

fn recommend(available: Option<u64>) -> Recommendation {
    let need = |m: &ModelInfo| (m.size as f64 * (1.0 + OVERHEAD)) as u64;
    let mut candidates: Vec<&'static ModelInfo> = REGISTRY
        .iter()
        .copied()
        .filter(|m| RUNNABLE_ARCHITECTURES.contains(&m.arch))
        .collect();
    candidates.sort_by_key(|m| m.size);
    let smallest = candidates[0];
    let Some(available) = available else {
        return pick(
            smallest,
            "free memory could not be read; the smallest model is the safe choice".into(),
        );
    };
    let budget = (available as f64 * SHARE_OF_AVAILABLE) as u64;
    match candidates.iter().rev().find(|m| need(m) <= budget) {
        Some(m) => pick(
            m,
            format!(
                "the largest model that fits: it needs about {} with its cache, and {} of the \
                 {} available may be used",
                gib(need(m)),
                gib(budget),
                gib(available)
            ),
        ),
        None => pick(
            smallest,
            format!(
                "no model fits comfortably in {} available; the smallest needs about {}",
                gib(available),
                gib(need(smallest))
            ),
        ),
    }
}

fn pick(m: &'static ModelInfo, reason: String) -> Recommendation {
    Recommendation {
        model: m.name,
        file: m.file,
        quantization: m.quantization(),
        size_bytes: m.size,
        reason,
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn cpu() -> Cpu {
    let logical_cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut model = info
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            matches!(key.trim(), "model name" | "Model" | "Hardware")
                .then(|| value.trim().to_owned())
        })
        .filter(|m| !m.is_empty());
    if model.is_none() && cfg!(target_os = "macos") {
        model = run("sysctl", &["-n", "machdep.cpu.brand_string"]);
    }
    // Distinct (physical id, core id) pairs; absent on many ARM kernels.
    let mut cores = std::collections::BTreeSet::new();
    let mut physical = None;
    for block in info.split("\n\n") {
        let field = |name: &str| {
            block.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_owned())
            })
        };
        if let Some(core) = field("core id") {
            cores.insert((field("physical id").unwrap_or_default(), core));
        }
    }
    if !cores.is_empty() {
        physical = Some(cores.len());
    }
    Cpu {
        model,
        logical_cores,
        physical_cores: physical,
        simd: simd(),
    }
}

fn simd() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! check {
            ($($feature:tt),*) => {
                $(if std::arch::is_x86_feature_detected!($feature) {
                    found.push($feature);
                })*
            };
        }
        check!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16"
        );
        // AMX has no stable runtime test in std; the kernel lists it among the CPU flags
        // (and enables it only when it supports it).
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags: Vec<&str> = info
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        for (flag, name) in [
            ("amx_tile", "amx-tile"),
            ("amx_int8", "amx-int8"),
            ("amx_bf16", "amx-bf16"),
        ] {
            if flags.contains(&flag) {
                found.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! check {
            ($($feature:tt),*) => {
                $(if std::arch::is_aarch64_feature_detected!($feature) {
                    found.push($feature);
                })*
            };
        }
        check!("neon", "dotprod", "i8mm", "fp16", "bf16", "sve");
    }
    found
}

fn memory() -> Memory {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    let mut total = field("MemTotal:");
    let available = field("MemAvailable:");
    if total.is_none() && cfg!(target_os = "macos") {
        total = run("sysctl", &["-n", "hw.memsize"]).and_then(|s| s.parse().ok());
    }
    Memory {
        total_bytes: total,
        available_bytes: available,
    }
}

fn gpus() -> Vec<Gpu> {
    let mut found = Vec::new();
    // NVIDIA's own tool knows names and memory; where it answers, it speaks for NVIDIA.
    if let Some(out) = run(
        "nvidia-smi",
        &[
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ],
    ) {
        for line in out.lines() {
            let mut parts = line.split(',').map(str::trim);
            let name = parts.next().filter(|n| !n.is_empty()).map(str::to_owned);
            let mib: Option<u64> = parts.next().and_then(|m| m.parse().ok());
            found.push(Gpu {
                vendor: "NVIDIA".into(),
                name,
                memory_bytes: mib.map(|m| m * 1024 * 1024),
                source: "nvidia-smi",
            });
        }
    }
    let have_nvidia = !found.is_empty();
    found.extend(
        drm_gpus(Path::new("/sys/class/drm"))
            .into_iter()
            .filter(|g| !(have_nvidia && g.vendor == "NVIDIA")),
    );
    if cfg!(target_os = "macos") {
        if let Some(out) = run("system_profiler", &["SPDisplaysDataType"]) {
            for name in out
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Chipset Model:"))
            {
                found.push(Gpu {
                    vendor: "Apple".into(),
                    name: Some(name.trim().to_owned()),
                    memory_bytes: None,
                    source: "system_profiler",
                });
            }
        }
    }
    found
}

/// GPUs under `/sys/class/drm/cardN/device` (the render nodes' PCI or platform devices).
fn drm_gpus(root: &Path) -> Vec<Gpu> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut cards: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("card") && n[4..].chars().all(|c| c.is_ascii_digit()))
        .collect();
    cards.sort();
    cards
        .into_iter()
        .filter_map(|card| {
            let device = root.join(&card).join("device");
            let vendor_id = read_trimmed(&device.join("vendor"));
            let vendor = match vendor_id.as_deref() {
                Some("0x10de") => "NVIDIA".to_owned(),
                Some("0x1002") => "AMD".to_owned(),
                Some("0x8086") => "Intel".to_owned(),
                Some("0x1af4") | Some("0x1234") => "virtual".to_owned(),
                Some(other) => format!("PCI vendor {other}"),
                // Platform GPUs (phones, SBCs) have no PCI vendor: name them by driver.
                None => {
                    let driver = std::fs::read_link(device.join("driver")).ok()?;
                    driver.file_name()?.to_string_lossy().into_owned()
                }
            };
            let memory_bytes =
                read_trimmed(&device.join("mem_info_vram_total")).and_then(|v| v.parse().ok());
            Some(Gpu {
                vendor,
                name: read_trimmed(&device.join("product_name")),
                memory_bytes,
                source: "drm",
            })
        })
        .collect()
}

fn thermal(root: &Path) -> Vec<Thermal> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut zones: Vec<_> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|e| {
            let milli: f64 = read_trimmed(&e.path().join("temp"))?.parse().ok()?;
            Some(Thermal {
                zone: read_trimmed(&e.path().join("type"))
                    .unwrap_or_else(|| e.file_name().to_string_lossy().into_owned()),
                celsius: milli / 1000.0,
            })
        })
        .collect();
    zones.sort_by(|a, b| a.zone.cmp(&b.zone));
    zones
}

fn battery(root: &Path) -> Option<Battery> {
    let entries = std::fs::read_dir(root).ok()?;
    entries.filter_map(|e| e.ok()).find_map(|e| {
        let path = e.path();
        (read_trimmed(&path.join("type")).as_deref() == Some("Battery")).then(|| Battery {
            percent: read_trimmed(&path.join("capacity")).and_then(|c| c.parse().ok()),
            status: read_trimmed(&path.join("status")),
        })
    })
}

fn read_trimmed(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// A tool's output, when it exists here and answers within a few seconds.
fn run(program: &str, args: &[&str]) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take()?, &mut out).ok()?;
    let out = out.trim().to_owned();
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_reads() {
        let hw = Hardware::detect();
        assert!(hw.cpu.logical_cores >= 1);
        if cfg!(target_os = "linux") {
            let total = hw.memory.total_bytes.unwrap();
            let available = hw.memory.available_bytes.unwrap();
            assert!(available <= total && total > 0);
            assert!(hw.cpu.model.is_some());
        }
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            hw.cpu.simd.contains(&"avx2"),
            std::arch::is_x86_feature_detected!("avx2")
        );
    }

    #[test]
    fn the_largest_model_that_fits_is_chosen() {
        let gib = 1u64 << 30;
        assert_eq!(recommend(Some(64 * gib)).model, "qwen15");
        assert_eq!(recommend(Some(gib)).model, "qwen05");
        assert_eq!(recommend(Some(200 << 20)).model, "smollm2");
        let none = recommend(Some(10 << 20));
        assert_eq!(none.model, "smollm2");
        assert!(none.reason.contains("no model fits"), "{}", none.reason);
        assert_eq!(recommend(None).model, "smollm2");
    }

    #[test]
    fn sysfs_trees_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let card = root.join("drm/card0/device");
        std::fs::create_dir_all(&card).unwrap();
        std::fs::write(card.join("vendor"), "0x1002\n").unwrap();
        std::fs::write(card.join("mem_info_vram_total"), "8589934592\n").unwrap();
        std::fs::create_dir_all(root.join("drm/card0-HDMI-A-1")).unwrap();
        let gpus = drm_gpus(&root.join("drm"));
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].vendor, "AMD");
        assert_eq!(gpus[0].memory_bytes, Some(8 << 30));

        let zone = root.join("thermal/thermal_zone0");
        std::fs::create_dir_all(&zone).unwrap();
        std::fs::write(zone.join("temp"), "45500\n").unwrap();
        std::fs::write(zone.join("type"), "x86_pkg_temp\n").unwrap();
        let t = thermal(&root.join("thermal"));
        assert_eq!(t[0].zone, "x86_pkg_temp");
        assert!((t[0].celsius - 45.5).abs() < 1e-9);

        let bat = root.join("power/BAT0");
        std::fs::create_dir_all(&bat).unwrap();
        std::fs::write(bat.join("type"), "Battery\n").unwrap();
        std::fs::write(bat.join("capacity"), "87\n").unwrap();
        std::fs::write(bat.join("status"), "Discharging\n").unwrap();
        let b = battery(&root.join("power")).unwrap();
        assert_eq!(b.percent, Some(87));
        assert_eq!(b.status.as_deref(), Some("Discharging"));
    }
}
