//! `agora`: the whole system in one process (`up`), one service per process (`serve`),
//! migrations and seed data. See `agora --help`.

mod bench;
mod bench_cache;
mod bench_chat;
mod bench_context;
mod bench_hot;
mod bench_refs;
mod bench_report;
mod bench_scenarios;
mod bench_system;
mod cli;
mod load;
mod procs;
mod services;

use clap::Parser as _;

/// jemalloc rather than glibc's malloc: 10-18% fewer instructions per request on the hot path,
/// and no per-thread arenas growing under load (BENCHMARKS.md, the jemalloc run).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli.run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
