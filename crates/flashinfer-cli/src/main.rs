//! `flashinfer`: the command-line face of flashinfer-rs.
//!
//! - `info`: the GPU(s), where NVRTC and the CUDA headers were found, the kernel cache.
//! - `demo`: a batch decode over a paged KV cache, on the GPU if there is one (checked against the
//!   CPU backend), else on the CPU backend (checked against a naive f64 computation).
//! - `warmup`: compiles kernels of the catalog into the disk cache ahead of time.
//! - `cache info` / `cache clear`: the on-disk kernel cache.
//! - `bench ...`: timed, checked benchmarks (see `bench/`).
//!
//! Exit status: 0 on success, 1 on an error or a failed check, 2 on a usage error (clap's).

use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand};

/// `println!` that ends the process quietly when stdout is a closed pipe (`flashinfer info | head`)
/// instead of panicking, as `println!` does.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say_line(format_args!($($arg)*))
    };
}

mod bench;
mod cache;
mod demo;
mod info;
mod warmup;

/// flashinfer-rs: attention kernels for LLM serving, compiled at run time, with an exact CPU backend.
#[derive(Debug, Parser)]
#[command(name = "flashinfer", version, about, long_about = None)]
struct Cli {
    /// More logging on stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the GPU(s), the NVRTC and CUDA headers found, and the kernel cache.
    Info,
    /// Run a batch decode on a paged KV cache and check it (GPU if present, else CPU backend).
    Demo(demo::DemoArgs),
    /// Compile kernels of the catalog into the disk cache ahead of time.
    Warmup(warmup::WarmupArgs),
    /// Inspect or clear the on-disk kernel cache.
    Cache {
        #[command(subcommand)]
        cmd: cache::CacheCmd,
    },
    /// Timed, checked benchmarks on the GPU.
    Bench {
        // Boxed: the benchmarks' argument blocks are large next to the other commands'.
        #[command(subcommand)]
        cmd: Box<bench::BenchCmd>,
    },
}

fn init_logging(verbose: u8) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::new(spec),
        _ => EnvFilter::new(match verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }),
    };
    // A second subscriber (never the case here) is not worth failing the command over.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Info => info::run(),
        Command::Demo(args) => demo::run(&args),
        Command::Warmup(args) => warmup::run(&args),
        Command::Cache { cmd } => cache::run(&cmd),
        Command::Bench { cmd } => bench::run(*cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Writes one line to stdout (see `say!`). A closed pipe ends the process with status 0, as
/// nobody is reading any more; any other write error ends it with status 1.
pub(crate) fn say_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// `1536` -> `1.5 KiB`.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
