use std::process::ExitCode;

// jemalloc keeps fragmentation low under many small, short-lived frames
// (the `jemalloc` feature, on by default; see Cargo.toml).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    postline::cli::main()
}
