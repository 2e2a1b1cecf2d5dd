//! `spine-webapp`: the example web app (see the crate docs and README.md).

use std::process::ExitCode;

use clap::Parser;

/// Upload an image, get its thumbnail from a Spine farm.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Where the web app listens.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    api: spine_client::ApiArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let api = match a.api.client() {
        Ok(api) => api,
        Err(e) => {
            eprintln!("spine-webapp: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(a.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("spine-webapp: cannot listen on {}: {e}", a.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "spine-webapp: open http://{} (dispatcher {})",
        a.listen, a.api.api
    );
    let serve =
        axum::serve(listener, spine_example_webapp::router(api)).with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    match serve.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spine-webapp: {e}");
            ExitCode::FAILURE
        }
    }
}
