//! `spine-wordcount DIR`: counts the words of every file in DIR across the farm, as one
//! map/reduce job (one fragment per file, large files cut between words), and prints the most
//! frequent words.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde_json::json;
use spine_protocol::Fragment;

/// Count the words of a folder of text files on a Spine farm.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Folder of UTF-8 text files (not searched recursively).
    dir: PathBuf,
    #[command(flatten)]
    api: spine_client::ApiArgs,
    /// How many of the most frequent words to print (0: all, as JSON on standard output).
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// Files larger than this are cut into fragments of about this size.
    #[arg(long, default_value_t = spine_example_wordcount::DEFAULT_FRAGMENT_BYTES)]
    fragment_bytes: usize,
    /// Map outputs per reduce step.
    #[arg(long, default_value_t = 16)]
    fan_in: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spine-wordcount: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let files = spine_client::fragments_from_dir(&a.dir, |_| true)?;
    let mut fragments = Vec::new();
    for f in files {
        let name = f.name.clone().unwrap_or_default();
        let text = String::from_utf8(f.data).map_err(|_| format!("{name}: not UTF-8 text"))?;
        for (i, piece) in spine_example_wordcount::split(&text, a.fragment_bytes)
            .into_iter()
            .enumerate()
        {
            fragments
                .push(Fragment::new(piece.as_bytes().to_vec()).with_name(format!("{name}#{i}")));
        }
    }
    let api = a.api.client()?;
    let started = std::time::Instant::now();
    let n = fragments.len();
    let id = api
        .submit(&json!({
            "capability": "wordcount.map",
            "reduce": "wordcount.reduce",
            "fan_in": a.fan_in,
            "fragments": fragments,
            "progress": true,
        }))
        .await?;
    eprintln!("job {id}: {n} fragments");
    let job = api.follow_with_bar(&id, "word count").await?;
    let output = api.output(&job).await?;
    let counts: Vec<(String, u64)> = serde_json::from_slice(&output)?;
    if a.top == 0 {
        println!("{}", String::from_utf8_lossy(&output));
    } else {
        for (w, c) in counts.iter().take(a.top) {
            println!("{c:>10}  {w}");
        }
    }
    let meta = &job["result"]["meta"];
    eprintln!(
        "{} words, {} distinct, {n} fragments, {} reduce steps, {} speculative copies, {:.2} s",
        meta["words"],
        meta["distinct"],
        meta["reduce_steps"],
        meta["speculative"],
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
