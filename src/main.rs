//! The `pgpivot` binary: parses the command line, loads the config and runs
//! the library. Config errors exit with status 2 and one line naming the key.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgpivot::config::{self, LogConfig, LogFormat, RuntimeFlavor};

#[derive(Parser)]
#[command(name = "pgpivot", version, about = "A failover-aware PostgreSQL proxy")]
struct Cli {
    /// TOML config file (defaults < file < PGPIVOT_* environment).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate the config, print the effective config and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local primary with hot standbys and pgpivot in front of it.
    Demo {
        /// Number of hot standbys.
        #[arg(long, default_value_t = 2)]
        standbys: usize,
    },
    /// Print the topology of a running pgpivot (reads its admin /status).
    Status {
        /// The admin endpoint (default: `[admin] address` of --config, else
        /// 127.0.0.1:9187).
        #[arg(long)]
        admin: Option<String>,
        /// Bearer token (default: `[admin] token` of --config,
        /// PGPIVOT_ADMIN__TOKEN).
        #[arg(long)]
        token: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Demo { standbys }) => {
            init_logging(&LogConfig::default());
            runtime(pgpivot::demo::run(standbys))
        }
        Some(Command::Status { admin, token }) => status(cli.config, admin, token),
        None => run_proxy(cli.config, cli.check_config),
    }
}

fn status(path: Option<PathBuf>, admin: Option<String>, token: Option<String>) -> ExitCode {
    let configured = config::load(path.as_deref()).ok().and_then(|c| c.admin);
    let address = admin
        .or_else(|| configured.as_ref().map(|a| a.address.clone()))
        .unwrap_or_else(|| "127.0.0.1:9187".into());
    let token = token.or_else(|| configured.and_then(|a| a.token));
    let fetched = runtime_value(pgpivot::admin::client::get_status(
        &address,
        token.as_deref(),
    ));
    match fetched {
        Ok(report) => {
            print!("{}", pgpivot::admin::status::render_table(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgpivot status: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime_value<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Runtime::new()?.block_on(f)
}

fn run_proxy(path: Option<PathBuf>, check_only: bool) -> ExitCode {
    let loaded = config::load(path.as_deref()).and_then(|file| file.validate().map(|s| (file, s)));
    let (file, settings) = match loaded {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("pgpivot: {e}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        println!("{}", file.to_toml_masked());
        return ExitCode::SUCCESS;
    }
    init_logging(&settings.log);
    let built = match settings.runtime.flavor {
        // The control path on this thread; `Proxy::start` starts the
        // session workers.
        RuntimeFlavor::PerCore => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        RuntimeFlavor::MultiThread => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.runtime.workers)
            .enable_all()
            .build(),
    };
    match built {
        Ok(rt) => finish(rt.block_on(serve(settings, path))),
        Err(e) => finish(Err(
            anyhow::Error::new(e).context("cannot start a tokio runtime")
        )),
    }
}

async fn serve(settings: config::Settings, path: Option<PathBuf>) -> anyhow::Result<()> {
    let timeout = settings.shutdown_timeout;
    let proxy = pgpivot::proxy::Proxy::start_with_path(settings, path).await?;
    let shared = proxy.shared.clone();
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            let _ = shared.reloads.reload().await;
        }
    });
    pgpivot::proxy::shutdown_signal().await?;
    tracing::info!("shutting down: ending sessions at their next idle point");
    let left = proxy.shutdown(timeout).await;
    if left > 0 {
        tracing::warn!(
            sessions = left,
            "shutdown timeout passed with sessions still open"
        );
    }
    Ok(())
}

fn runtime(main: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    finish(rt.block_on(main))
}

fn finish(outcome: anyhow::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgpivot: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
