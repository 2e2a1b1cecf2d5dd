//! `spine-image-batch DIR --output sheet.png`: thumbnails every PNG and JPEG in DIR across the
//! farm (`image.thumbnail`, one map step per image) and lays them out on one contact sheet
//! (`image.contact-sheet`, the reduce step).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde_json::json;

/// Thumbnail a folder of images on a Spine farm and build a contact sheet.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Folder of PNG and JPEG images (not searched recursively).
    dir: PathBuf,
    /// Where to write the contact sheet (PNG).
    #[arg(long, short)]
    output: PathBuf,
    /// Thumbnail size (largest side, pixels).
    #[arg(long, default_value_t = 128)]
    size: u32,
    /// Thumbnails across the sheet (default: a square grid).
    #[arg(long)]
    columns: Option<u32>,
    #[command(flatten)]
    api: spine_client::ApiArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spine-image-batch: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether a file name looks like an image the agent reads.
fn is_image(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".png", ".jpg", ".jpeg"].iter().any(|e| lower.ends_with(e))
}

async fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let images = spine_client::fragments_from_dir(&a.dir, is_image)?;
    if images.is_empty() {
        return Err(format!("no .png, .jpg or .jpeg files in {}", a.dir.display()).into());
    }
    let n = images.len() as u64;
    let mut args = json!({ "size": a.size });
    if let Some(c) = a.columns {
        args["columns"] = json!(c);
    }
    let api = a.api.client()?;
    let started = std::time::Instant::now();
    let id = api
        .submit(&json!({
            "capability": "image.thumbnail",
            "reduce": "image.contact-sheet",
            // One sheet: every thumbnail goes to a single reduce step.
            "fan_in": n.clamp(2, spine_protocol::MAX_FAN_IN),
            "args": args,
            "fragments": images,
            "progress": true,
        }))
        .await?;
    eprintln!("job {id}: {n} images");
    let job = api.follow_with_bar(&id, "image batch").await?;
    let sheet = api.output(&job).await?;
    std::fs::write(&a.output, &sheet)
        .map_err(|e| format!("writing {}: {e}", a.output.display()))?;
    let meta = &job["result"]["meta"];
    eprintln!(
        "{}: {}×{} contact sheet of {n} thumbnails in {:.2} s",
        a.output.display(),
        meta["width"],
        meta["height"],
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
