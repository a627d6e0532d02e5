//! The `kernels` binary: see `kernels --help`.

fn main() -> std::process::ExitCode {
    kernels_cli::cli::main()
}
