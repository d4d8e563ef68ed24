//! Helpers shared by the subcommands: stage spinners, sizes, output-path checks.

use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner for one stage on stderr (hidden when stderr is not a terminal).
pub fn stage(name: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix:>6} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_prefix(name.to_string());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

pub fn done(pb: ProgressBar, msg: String) {
    pb.finish_and_clear();
    if console_is_tty() {
        eprintln!("  {:>6} {msg}", pb.prefix());
    }
}

pub fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

/// Fails early (before any work) when the output cannot be written.
pub fn check_output_path(out: &Path) -> Result<(), String> {
    if out.file_name().is_none() {
        return Err(format!("output {} is not a file path", out.display()));
    }
    if out.is_dir() {
        return Err(format!("output {} is a directory", out.display()));
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "cannot write {}: directory {} does not exist",
            out.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// Writes one line to stdout. A closed pipe (`ferry … | head`) is not an error: the
/// reader has what it wanted, so the line is dropped instead of panicking as `println!`
/// would.
pub fn outln(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// `<stem>-<suffix>.onnx` beside `output` (`model.onnx` → `model-optimized.onnx`).
pub fn sibling(output: &Path, suffix: &str) -> std::path::PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    output.with_file_name(format!("{stem}-{suffix}.onnx"))
}

/// `--external-data` as the writer's option: always, or only past protobuf's 2 GiB limit.
pub fn external_data(always: bool) -> ferry_onnx::ExternalData {
    if always {
        return ferry_onnx::ExternalData::Always;
    }
    // Tests reach the automatic switch (protobuf's 2 GiB limit) with small files by setting
    // a smaller limit in bytes.
    match std::env::var("FERRY_EXTERNAL_DATA_PAST")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(n) => ferry_onnx::ExternalData::Past(n),
        None => ferry_onnx::ExternalData::Auto,
    }
}
