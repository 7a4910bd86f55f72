//! `shoal detect`: this device's hardware and the model it would pick.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use clap::Args;
use shoal_models::hardware::Hardware;

#[derive(Args)]
pub(crate) struct DetectArgs {
    /// Print JSON (`{"hardware": …, "recommended": …}`) instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: DetectArgs) -> anyhow::Result<ExitCode> {
    let hw = Hardware::detect();
    let pick = hw.recommend();
    let mut out = String::new();
    if a.json {
        let value = serde_json::json!({ "hardware": hw, "recommended": pick });
        out = serde_json::to_string_pretty(&value)? + "\n";
        return print(&out);
    }
    let gib = |b: Option<u64>| match b {
        Some(b) => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        None => "unknown".to_owned(),
    };
    let cpu = &hw.cpu;
    writeln!(out, "device    {} {}", hw.os, hw.arch)?;
    writeln!(
        out,
        "cpu       {} — {} threads{}",
        cpu.model.as_deref().unwrap_or("unknown model"),
        cpu.logical_cores,
        cpu.physical_cores
            .map(|p| format!(", {p} cores"))
            .unwrap_or_default()
    )?;
    writeln!(
        out,
        "simd      {}",
        if cpu.simd.is_empty() {
            "none detected".to_owned()
        } else {
            cpu.simd.join(" ")
        }
    )?;
    writeln!(
        out,
        "memory    {} total, {} available",
        gib(hw.memory.total_bytes),
        gib(hw.memory.available_bytes)
    )?;
    if hw.gpus.is_empty() {
        writeln!(out, "gpu       none found")?;
    }
    for g in &hw.gpus {
        writeln!(
            out,
            "gpu       {}{}{} (from {})",
            g.vendor,
            g.name.as_ref().map(|n| format!(" {n}")).unwrap_or_default(),
            g.memory_bytes
                .map(|m| format!(", {}", gib(Some(m))))
                .unwrap_or_default(),
            g.source
        )?;
    }
    for t in &hw.thermal {
        writeln!(out, "thermal   {} {:.1} °C", t.zone, t.celsius)?;
    }
    if let Some(b) = &hw.battery {
        writeln!(
            out,
            "battery   {}{}",
            b.percent
                .map(|p| format!("{p}%"))
                .unwrap_or_else(|| "?".into()),
            b.status
                .as_ref()
                .map(|s| format!(", {s}"))
                .unwrap_or_default()
        )?;
    }
    writeln!(
        out,
        "would run {} ({}, {}): {}",
        pick.model, pick.file, pick.quantization, pick.reason
    )?;
    print(&out)
}

/// Writes `text` to stdout; a reader that stopped early (`| head`) is not an error.
fn print(text: &str) -> anyhow::Result<ExitCode> {
    match std::io::stdout().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}
