//! Helpers shared by the benches.

/// Logs of an in-process pgpivot on stderr, at `default` level and up
/// (`RUST_LOG` overrides), so they stay out of the printed tables.
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
