//! `spine bench images`: the image workload of issue 17 — thumbnails of a set of generated
//! photos of several MB each, made by Spine on a local farm (each photo uploaded as a job's raw
//! input into the dispatcher's blob store, fetched by an agent over the data plane, thumbnailed
//! by `image.thumbnail`, the thumbnail returned as the job's output) beside one process making
//! the same thumbnails with the same handler function, in alternating runs of the same
//! invocation.
//!
//! The photos are generated once per invocation into a temporary directory and read from disk
//! by both sides (never all held in memory). Every thumbnail Spine returns must equal, byte for
//! byte, the one the single process made from the same photo (the handler decodes, resizes and
//! encodes deterministically); any other output fails the benchmark. Peak memory: the farm runs
//! in this process, so the figure is the growth of the whole process's peak RSS during a leg
//! (server, dispatcher, agents and client together), as in `bench payload`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use image::{ImageEncoder as _, RgbImage};
use rand::{Rng as _, RngCore as _, SeedableRng as _};
use serde_json::{json, Value};

use super::payload::{peak_growth, reset_peak};
use super::{median, wait_for_agents};

/// The capability measured.
const CAPABILITY: &str = "image.thumbnail";

/// JPEG quality of the generated photos: the "high quality" of a camera's best setting.
const QUALITY: u8 = 92;

/// Amplitude of the per-pixel noise (± this, per channel, uniform). Sensor noise of a photo
/// taken in dim light; it is what makes the file size (JPEG cannot compress noise away), so
/// with it and [`QUALITY`] fixed a photo's size follows its pixel count.
const NOISE: i32 = 20;

/// The seed of the photos: the same flags give the same photos, byte for byte.
const SEED: u64 = 17;

/// What to run.
pub(super) struct Options {
    /// Photos generated (and thumbnailed per run and side).
    pub(super) photos: usize,
    /// Smallest photo file size, MiB.
    pub(super) min_mib: f64,
    /// Largest photo file size, MiB.
    pub(super) max_mib: f64,
    /// Agent counts, one farm each per run (one slot per agent).
    pub(super) agents: Vec<usize>,
    /// Thumbnail size (fit inside size × size).
    pub(super) size: u32,
    /// Runs (the median is reported).
    pub(super) runs: usize,
    /// Jobs in flight; `None`: twice the farm's agents.
    pub(super) window: Option<usize>,
}

/// One generated photo on disk.
struct Photo {
    path: PathBuf,
    bytes: u64,
    width: u32,
    height: u32,
}

/// A photo-like image: smooth colour gradients and a soft wave pattern (the "scene"), plus
/// uniform noise of ±[`NOISE`] per channel (the "grain"). Rows and columns are precomputed,
/// so a 20-megapixel photo takes well under a second to make.
fn photo_pixels(seed: u64, width: u32, height: u32) -> RgbImage {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let base: [f32; 3] = std::array::from_fn(|_| rng.random_range(60.0..180.0));
    let gx: [f32; 3] = std::array::from_fn(|_| rng.random_range(-60.0..60.0));
    let gy: [f32; 3] = std::array::from_fn(|_| rng.random_range(-60.0..60.0));
    let amp: [f32; 3] = std::array::from_fn(|_| rng.random_range(10.0..40.0));
    let (kx, ky) = (rng.random_range(2.0..9.0f32), rng.random_range(2.0..9.0f32));
    let (px, py) = (rng.random_range(0.0..6.3f32), rng.random_range(0.0..6.3f32));
    let fx = |x: u32| x as f32 / width as f32;
    let fy = |y: u32| y as f32 / height as f32;
    let wave_x: Vec<f32> = (0..width).map(|x| (kx * fx(x) * 6.3 + px).sin()).collect();
    let mut img = RgbImage::new(width, height);
    let mut noise = vec![0u8; width as usize * 3];
    for (y, row) in img.rows_mut().enumerate() {
        let y = y as u32;
        let wave_y = (ky * fy(y) * 6.3 + py).sin();
        rng.fill_bytes(&mut noise);
        for ((x, p), n) in row.enumerate().zip(noise.chunks_exact(3)) {
            for c in 0..3 {
                let v = base[c]
                    + gx[c] * fx(x as u32)
                    + gy[c] * fy(y)
                    + amp[c] * wave_x[x] * wave_y
                    + ((i32::from(n[c]) - 128) * NOISE / 128) as f32;
                p[c] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    img
}

fn jpeg(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, QUALITY)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .context("encoding a generated photo")?;
    Ok(out)
}

/// Generates `n` photos into `dir`, their file sizes spread evenly over `min..=max` bytes in a
/// shuffled order (so that large and small photos interleave in the job stream).
///
/// How the sizes are hit: with the content, noise and quality fixed, the size of a JPEG is
/// close to proportional to its pixel count. A 1200 × 800 sample is encoded first to measure
/// the bytes per pixel; each photo then gets a 3:2 frame of target size ÷ that many pixels.
/// The actual sizes land within a few per cent of the targets (they are printed). Photos are
/// made on every core, each from its own seed, and written straight to disk.
fn generate(dir: &Path, n: usize, min: u64, max: u64) -> Result<(Vec<Photo>, f64)> {
    let sample = jpeg(&photo_pixels(SEED, 1200, 800))?;
    let bytes_per_pixel = sample.len() as f64 / (1200.0 * 800.0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let mut targets: Vec<u64> = (0..n)
        .map(|i| match n {
            1 => min,
            _ => min + (max - min) * i as u64 / (n as u64 - 1),
        })
        .collect();
    for i in (1..n).rev() {
        targets.swap(i, rng.random_range(0..=i));
    }
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |c| c.get());
    let made = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<Vec<(usize, Photo)>> {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&target) = targets.get(i) else {
                            return Ok(mine);
                        };
                        let pixels = target as f64 / bytes_per_pixel;
                        let side = spine_example_image::MAX_SIDE as f64;
                        let width = (pixels * 1.5).sqrt().clamp(16.0, side) as u32;
                        let height = (f64::from(width) / 1.5).max(16.0) as u32;
                        let data = jpeg(&photo_pixels(SEED + 1 + i as u64, width, height))?;
                        let path = dir.join(format!("photo-{i:04}.jpg"));
                        std::fs::write(&path, &data)
                            .with_context(|| format!("writing {}", path.display()))?;
                        mine.push((
                            i,
                            Photo {
                                path,
                                bytes: data.len() as u64,
                                width,
                                height,
                            },
                        ));
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a photo generator panicked"))??,
            );
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let mut made = made;
    made.sort_by_key(|(i, _)| *i);
    Ok((made.into_iter().map(|(_, p)| p).collect(), bytes_per_pixel))
}

/// The arguments of every thumbnail job (and of the single process's handler calls).
fn thumbnail_args(size: u32) -> serde_json::Map<String, Value> {
    let mut args = serde_json::Map::new();
    args.insert("size".into(), json!(size));
    args
}

/// The baseline: one process, one photo at a time, each read from disk and passed to the very
/// function the agents' `image.thumbnail` handler calls. Returns the seconds and the
/// thumbnails (the reference every Spine output is checked against).
fn single_process(photos: &[Photo], size: u32) -> Result<(f64, Vec<Vec<u8>>)> {
    let args = thumbnail_args(size);
    let t = Instant::now();
    let mut thumbs = Vec::with_capacity(photos.len());
    for p in photos {
        let data =
            std::fs::read(&p.path).with_context(|| format!("reading {}", p.path.display()))?;
        let out = spine_example_image::process(CAPABILITY, &args, &data)
            .map_err(|e| anyhow::anyhow!("thumbnail of {}: {e}", p.path.display()))?;
        thumbs.push(out.bytes);
    }
    Ok((t.elapsed().as_secs_f64(), thumbs))
}

/// One Spine run: a fresh farm of `agents` agents (one slot each), every photo submitted as a
/// raw upload (streamed from its file) with `window` jobs in flight, each followed to its end
/// and its output read and checked against `thumbs`. Returns the seconds from the first upload
/// to the last output read (the farm's start and stop are not counted) and the thumbnails
/// checked.
async fn spine_run(
    photos: &[Photo],
    thumbs: &[Vec<u8>],
    agents: usize,
    window: usize,
    size: u32,
    largest: u64,
) -> Result<(f64, usize)> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    // Room for the largest photo in every limit (the dispatcher's and each agent's).
    let limit = bytesize::ByteSize::b((largest + (1 << 20)).max(64 << 20));
    let farm = crate::up::Farm::start(crate::up::FarmOptions {
        agents,
        slots: 1,
        xmpp_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        max_blob: Some(limit),
        dispatcher: Some(Box::new(
            move |cfg: &mut spine_dispatcher::DispatcherConfig| {
                cfg.max_input = cfg.max_input.max(limit);
            },
        )),
        agent: Some(Box::new(move |cfg: &mut spine_agent::AgentConfig| {
            cfg.max_input_size = cfg.max_input_size.max(limit);
        })),
        extra_agents: Vec::new(),
    })
    .await?;
    let result = submit_all(&farm, photos, thumbs, agents, window, size).await;
    farm.stop().await;
    result
}

async fn submit_all(
    farm: &crate::up::Farm,
    photos: &[Photo],
    thumbs: &[Vec<u8>],
    agents: usize,
    window: usize,
    size: u32,
) -> Result<(f64, usize)> {
    let api = spine_client::Client::new(&format!("http://{}", farm.http), None)?;
    wait_for_agents(&api, CAPABILITY, agents).await?;
    let fields = json!({ "capability": CAPABILITY, "args": thumbnail_args(size) });
    let t = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    let (mut started, mut checked) = (0, 0);
    while started < photos.len() || !running.is_empty() {
        while started < photos.len() && running.len() < window {
            let (api, fields, i) = (api.clone(), fields.clone(), started);
            let path = photos[i].path.clone();
            running.spawn(async move {
                let id = api.submit_file(&fields, &path, "image/jpeg").await?;
                let job = api.follow(&id, |_, _| {}).await?;
                anyhow::ensure!(
                    job["state"] == "succeeded",
                    "the thumbnail of {} (job {id}) ended {}: {}",
                    path.display(),
                    job["state"],
                    job["error"]
                );
                Ok((i, api.output(&job).await?))
            });
            started += 1;
        }
        if let Some(r) = running.join_next().await {
            let (i, out) = r.context("a job task")??;
            if out != thumbs[i] {
                let dims = |b: &[u8]| {
                    image::load_from_memory(b)
                        .map(|d| format!("{}×{}", d.width(), d.height()))
                        .unwrap_or_else(|e| format!("not an image ({e})"))
                };
                anyhow::bail!(
                    "the thumbnail of {} differs from the single process's: {} bytes ({}) against {} bytes ({})",
                    photos[i].path.display(),
                    out.len(),
                    dims(&out),
                    thumbs[i].len(),
                    dims(&thumbs[i])
                );
            }
            checked += 1;
        }
    }
    Ok((t.elapsed().as_secs_f64(), checked))
}

/// Figures of one side (the single process or a farm size) over the runs.
#[derive(Default)]
struct Side {
    secs: Vec<f64>,
    peak: Vec<u64>,
}

impl Side {
    fn json(&self, photos: usize, mb: f64, baseline: &[f64]) -> Value {
        let s = median(self.secs.clone());
        let ratios: Vec<f64> = self.secs.iter().zip(baseline).map(|(a, b)| a / b).collect();
        json!({
            "s_runs": self.secs,
            "s": s,
            "photos_per_s": photos as f64 / s,
            "mb_s": mb / s,
            "over_single_process_runs": ratios,
            "over_single_process": median(ratios.clone()),
            "peak_rss_growth_bytes": self.peak.iter().max(),
        })
    }
}

/// Runs the scenario; returns the JSON report.
pub(super) async fn run(o: Options) -> Result<Value> {
    let mib = |m: f64| (m * 1024.0 * 1024.0) as u64;
    let photo_dir = tempfile::Builder::new()
        .prefix("spine-bench-images-")
        .tempdir()
        .context("temporary directory for the photos")?;
    let t = Instant::now();
    let (dir, n, min, max) = (
        photo_dir.path().to_path_buf(),
        o.photos,
        mib(o.min_mib),
        mib(o.max_mib),
    );
    let (photos, bytes_per_pixel) =
        tokio::task::spawn_blocking(move || generate(&dir, n, min, max))
            .await
            .context("the photo generator")??;
    let generated_s = t.elapsed().as_secs_f64();
    let total: u64 = photos.iter().map(|p| p.bytes).sum();
    let smallest = photos.iter().map(|p| p.bytes).min().unwrap_or(0);
    let largest = photos.iter().map(|p| p.bytes).max().unwrap_or(0);
    let pixels: Vec<u64> = photos
        .iter()
        .map(|p| u64::from(p.width) * u64::from(p.height))
        .collect();
    let mb = total as f64 / 1e6;
    let megapixels = pixels.iter().sum::<u64>() as f64 / 1e6;
    let window_of = |agents: usize| o.window.unwrap_or(2 * agents);
    println!(
        "images: {} photos (JPEG quality {QUALITY}, {:.2} bytes per pixel), {:.1}–{:.1} MB each, {:.0} MB and {:.0} megapixels in all, generated in {generated_s:.1} s; {CAPABILITY} size {}; {} runs; {} cores",
        photos.len(),
        bytes_per_pixel,
        smallest as f64 / 1e6,
        largest as f64 / 1e6,
        mb,
        megapixels,
        o.size,
        o.runs,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut head = format!("{:>4} {:>22}", "run", "single process");
    for &a in &o.agents {
        head.push_str(&format!(
            " {:>34}",
            format!("spine {a} agent(s), window {}", window_of(a))
        ));
    }
    println!("{head}");
    let photos = std::sync::Arc::new(photos);
    let mut baseline = Side::default();
    let mut farms: Vec<Side> = o.agents.iter().map(|_| Side::default()).collect();
    // Thumbnails checked equal to the single process's, over all runs and farms; photos done
    // by one farm in one run (the most).
    let (mut checked, mut done) = (0usize, 0usize);
    let cell = |s: f64| {
        format!(
            "{s:.2} s {:.2}/s {:.0} MB/s",
            photos.len() as f64 / s,
            mb / s
        )
    };
    let mut reference: Option<Vec<Vec<u8>>> = None;
    for r in 0..o.runs {
        // The single process, then Spine, in every run: the two alternate, so drift in the
        // machine's load falls on both sides.
        let ps = photos.clone();
        let size = o.size;
        let base = reset_peak();
        let (row_base, thumbs) = tokio::task::spawn_blocking(move || single_process(&ps, size))
            .await
            .context("the single process")??;
        baseline.peak.extend(peak_growth(base));
        if let Some(first) = &reference {
            anyhow::ensure!(
                *first == thumbs,
                "the single process made other thumbnails in run {} than in run 1: the handler is not deterministic, so outputs cannot be compared byte for byte",
                r + 1
            );
        }
        let thumbs = reference.get_or_insert(thumbs);
        let mut row_farms = vec![0.0; o.agents.len()];
        for (k, &a) in o.agents.iter().enumerate() {
            let base = reset_peak();
            let (s, n) = spine_run(&photos, thumbs, a, window_of(a), o.size, largest).await?;
            farms[k].peak.extend(peak_growth(base));
            row_farms[k] = s;
            checked += n;
            done = done.max(n);
        }
        baseline.secs.push(row_base);
        let mut line = format!("{:>4} {:>22}", r + 1, cell(row_base));
        for (k, s) in row_farms.iter().enumerate() {
            farms[k].secs.push(*s);
            line.push_str(&format!(
                " {:>34}",
                format!("{} (÷ single {:.2})", cell(*s), s / row_base)
            ));
        }
        println!("{line}");
    }
    let b = median(baseline.secs.clone());
    let mut line = format!("medians: single process {}", cell(b));
    let mut rows = Vec::new();
    for (k, &a) in o.agents.iter().enumerate() {
        let mut v = farms[k].json(photos.len(), mb, &baseline.secs);
        v["agents"] = json!(a);
        v["window"] = json!(window_of(a));
        line.push_str(&format!(
            "; {a} agent(s) {} (time ÷ single process {:.2})",
            cell(v["s"].as_f64().unwrap_or(f64::NAN)),
            v["over_single_process"].as_f64().unwrap_or(f64::NAN)
        ));
        rows.push(v);
    }
    println!("{line}");
    let peak = |s: &Side| {
        s.peak
            .iter()
            .max()
            .map_or("?".to_owned(), |p| format!("{:.0}", *p as f64 / 1048576.0))
    };
    let mut line = format!("peak RSS growth: single process +{} MiB", peak(&baseline));
    for (k, &a) in o.agents.iter().enumerate() {
        line.push_str(&format!(
            ", {a} agent(s) +{} MiB (the whole farm)",
            peak(&farms[k])
        ));
    }
    println!("{line}");
    let mut single = baseline.json(photos.len(), mb, &baseline.secs);
    if let Some(m) = single.as_object_mut() {
        m.remove("over_single_process_runs");
        m.remove("over_single_process");
    }
    Ok(json!({
        "photos": photos.len(),
        "photos_done": done,
        "thumbnails_checked": checked,
        "runs": o.runs,
        "size": o.size,
        "quality": QUALITY,
        "noise": NOISE,
        "seed": SEED,
        "bytes_per_pixel": bytes_per_pixel,
        "photo_bytes": { "min": smallest, "max": largest, "total": total },
        "megapixels_total": megapixels,
        "generate_s": generated_s,
        "single_process": single,
        "spine": rows,
        "peak_rss_note": "growth of the whole process's VmHWM during the leg: the farm (server, dispatcher, agents) and the client run in this process",
    }))
}
