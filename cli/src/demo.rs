//! `spine up --demo`: the two example workloads end to end on the local farm, through the
//! dispatcher's HTTP API like any web app — an image batch (thumbnails as map steps, a contact
//! sheet as the reduce) and a word count of the bundled corpus (split, map, a tree of reduces),
//! checked against a single-process count.

use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use serde_json::{json, Value};
use spine_protocol::Fragment;

/// Images in the demo batch.
const IMAGES: usize = 16;
/// Size of the pieces the corpus is split into.
const FRAGMENT_BYTES: u64 = 4096;
/// Reduce fan-in of the word count (small, so the demo shows a tree).
const FAN_IN: u64 = 4;

/// Runs both workloads; results go in `out_dir` (named in the output when `kept`).
pub async fn run(api: &spine_client::Client, out_dir: &Path, kept: bool) -> Result<()> {
    let shown = |p: &Path| {
        if kept {
            format!(" → {}", p.display())
        } else {
            String::new()
        }
    };
    image_batch(api, out_dir, &shown).await?;
    word_count(api, out_dir, &shown).await
}

/// Until every local agent offers the demo capabilities (at most 30 s).
/// `GET /v1/capabilities`.
async fn capabilities(api: &spine_client::Client) -> Result<serde_json::Value> {
    Ok(api
        .call(
            api.request(reqwest::Method::GET, "/v1/capabilities"),
            "listing capabilities",
        )
        .await?)
}

/// Waits (30 s at most) until each of `caps` has an agent.
pub(crate) async fn wait_for_capabilities(
    api: &spine_client::Client,
    caps: &[String],
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = capabilities(api).await?;
        let missing: Vec<&String> = caps
            .iter()
            .filter(|name| {
                !listed["capabilities"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["name"] == name.as_str() && c["agents"].as_u64() >= Some(1))
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no agent offered {missing:?} within 30 s (see the log for the agent's error)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn wait_for_agents(api: &spine_client::Client, agents: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let caps = capabilities(api).await?;
        let ready = |name: &str| {
            caps["capabilities"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["name"] == name && c["agents"].as_u64() >= Some(agents as u64))
        };
        if ready("image.thumbnail") && ready("wordcount.map") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the local agents did not register within 30 s: {caps}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A 480×320 test picture: a diagonal gradient in its own hue with a bright disc.
fn picture(i: usize) -> Result<Vec<u8>> {
    let hue = i as f32 / IMAGES as f32;
    let base = hsv(hue, 0.7, 0.9);
    let (w, h) = (480u32, 320u32);
    let (cx, cy, r) = (
        (80 + (i as u32 * 37) % 320) as f32,
        (80 + (i as u32 * 53) % 160) as f32,
        60.0f32,
    );
    let img = RgbImage::from_fn(w, h, |x, y| {
        let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
        if d < r {
            return Rgb([250, 250, 240]);
        }
        let t = (x + y) as f32 / (w + h) as f32;
        Rgb(base.map(|c| (c * (0.35 + 0.65 * t) * 255.0) as u8))
    });
    let mut buf = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img)
        .write_to(&mut buf, ImageFormat::Png)
        .context("encoding a demo image")?;
    Ok(buf.into_inner())
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - f * s), v * (1.0 - (1.0 - f) * s));
    match i as i32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

async fn image_batch(
    api: &spine_client::Client,
    out_dir: &Path,
    shown: &dyn Fn(&Path) -> String,
) -> Result<()> {
    let images: Vec<Fragment> = (0..IMAGES)
        .map(|i| {
            Ok(Fragment::new(picture(i)?)
                .with_name(format!("picture-{i:02}.png"))
                .with_mime("image/png"))
        })
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let id = api
        .submit(&json!({
            "capability": "image.thumbnail",
            "reduce": "image.contact-sheet",
            "fan_in": IMAGES,
            "args": { "size": 96, "columns": 4 },
            "fragments": images,
            "progress": true,
        }))
        .await?;
    let job = api.follow_with_bar(&id, "image batch").await?;
    let sheet = api.output(&job).await?;
    let elapsed = started.elapsed();
    let decoded = image::load_from_memory(&sheet).context("decoding the contact sheet")?;
    // 4 columns of 96 px cells with 8 px gaps.
    let side = 4 * (96 + 8) + 8;
    if (decoded.width(), decoded.height()) != (side, side) {
        bail!(
            "the contact sheet is {}×{}, expected {side}×{side}",
            decoded.width(),
            decoded.height()
        );
    }
    let path = out_dir.join("contact-sheet.png");
    std::fs::write(&path, &sheet).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "image batch: {IMAGES} images thumbnailed across the farm, contact sheet {side}×{side} in {:.2} s{}",
        elapsed.as_secs_f64(),
        shown(&path)
    );
    Ok(())
}

/// The whole corpus as one text, and its single-process count.
pub fn corpus() -> String {
    spine_example_wordcount::CORPUS
        .iter()
        .map(|(_, text)| *text)
        .collect::<Vec<_>>()
        .join("\n")
}

async fn word_count(
    api: &spine_client::Client,
    out_dir: &Path,
    shown: &dyn Fn(&Path) -> String,
) -> Result<()> {
    let text = corpus();
    let started = Instant::now();
    let id = api
        .submit(&json!({
            "capability": "wordcount.map",
            "reduce": "wordcount.reduce",
            "split": "wordcount.split",
            "fan_in": FAN_IN,
            "args": { "fragment_bytes": FRAGMENT_BYTES },
            "input": spine_client::base64(text.as_bytes()),
            "input_type": "text/plain; charset=utf-8",
            "progress": true,
        }))
        .await?;
    let job = api.follow_with_bar(&id, "word count ").await?;
    let output = api.output(&job).await?;
    let elapsed = started.elapsed();
    let farm: Vec<(String, u64)> =
        serde_json::from_slice(&output).context("reading the word counts")?;
    let mut local = spine_example_wordcount::Counts::new();
    spine_example_wordcount::count_into(&mut local, &text);
    let local = spine_example_wordcount::sorted(local);
    if farm != local {
        bail!(
            "the farm's word count differs from a single-process count ({} vs {} distinct words)",
            farm.len(),
            local.len()
        );
    }
    let path = out_dir.join("wordcount.json");
    std::fs::write(&path, &output).with_context(|| format!("writing {}", path.display()))?;
    let meta: &Value = &job["result"]["meta"];
    println!(
        "word count: {} words ({} distinct) in {} files, {} fragments, {} reduce steps, {} speculative copies, {:.2} s; equal to a single-process count{}",
        meta["words"],
        meta["distinct"],
        spine_example_wordcount::CORPUS.len(),
        meta["fragments"],
        meta["reduce_steps"],
        meta["speculative"],
        elapsed.as_secs_f64(),
        shown(&path)
    );
    let top: Vec<String> = farm
        .iter()
        .take(10)
        .map(|(w, n)| format!("{w} {n}"))
        .collect();
    println!("most frequent: {}", top.join(", "));
    Ok(())
}
