//! Example Spine agent: image processing with the `image` crate.
//!
//! Capabilities (input: a PNG or JPEG image; output: the same format unless `format` says
//! otherwise):
//!
//! - `image.thumbnail`: fit inside `size`×`size` (default 128), aspect ratio kept;
//! - `image.resize`: exactly `width`×`height` (both required);
//! - `image.grayscale`: luminance only (output pixels have R = G = B);
//! - `image.blur`: Gaussian blur of strength `sigma` (default 2.0, at most 50);
//! - `image.contact-sheet`: the reduce step of an image batch. Input: a fragment list
//!   (docs/PROTOCOL.md §11.7) of images; output: one PNG with the images in a grid, in order,
//!   each centred in a square cell of `tile` pixels (default: the largest side among them),
//!   `columns` across (default: the smallest square grid), 8 px apart on a dark background.
//!   Metadata: `width`, `height`, `images`, `names` (the fragments' labels, in order).
//!
//! Optional argument `format`: `png` or `jpeg`. Result metadata: `width`, `height`, `format`.
//! Any other argument is refused with `bad-arguments` naming it ([`accepted_args`]).
//! The work runs on the blocking thread pool so the agent's connection task is never held up.
//! Images larger than 64 KiB travel as blobs (docs/PROTOCOL.md §13) without anything to do here.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat};
use serde_json::Value;
use spine_agent::{AgentBuilder, JobContext, JobError, Output};
use spine_protocol::fragments;

/// Largest width or height accepted or produced.
pub const MAX_SIDE: u32 = 16_384;

fn decode(input: &[u8]) -> Result<(DynamicImage, ImageFormat), JobError> {
    if input.is_empty() {
        return Err(JobError::bad_argument(
            "input",
            "an image (PNG or JPEG) is required",
        ));
    }
    let format = image::guess_format(input)
        .map_err(|_| JobError::bad_argument("input", "not a PNG or JPEG image"))?;
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg) {
        return Err(JobError::bad_argument(
            "input",
            format!("{format:?} is not supported (PNG or JPEG)"),
        ));
    }
    let img = image::load_from_memory_with_format(input, format)
        .map_err(|e| JobError::bad_argument("input", format!("cannot decode the image: {e}")))?;
    if img.width() > MAX_SIDE || img.height() > MAX_SIDE {
        return Err(JobError::bad_argument(
            "input",
            format!("larger than {MAX_SIDE} pixels on a side"),
        ));
    }
    Ok((img, format))
}

fn out_format(
    args: &serde_json::Map<String, Value>,
    input: ImageFormat,
) -> Result<ImageFormat, JobError> {
    match args.get("format") {
        None => Ok(input),
        Some(Value::String(s)) if s == "png" => Ok(ImageFormat::Png),
        Some(Value::String(s)) if s == "jpeg" || s == "jpg" => Ok(ImageFormat::Jpeg),
        Some(_) => Err(JobError::bad_argument(
            "format",
            "expected \"png\" or \"jpeg\"",
        )),
    }
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Result<Output, JobError> {
    let mut buf = Cursor::new(Vec::new());
    // JPEG has no alpha channel: flatten to RGB first.
    let result = match format {
        ImageFormat::Jpeg => DynamicImage::ImageRgb8(img.to_rgb8()).write_to(&mut buf, format),
        _ => img.write_to(&mut buf, format),
    };
    result.map_err(|e| JobError::Failed(format!("cannot encode the image: {e}")))?;
    let (mime, name) = match format {
        ImageFormat::Jpeg => ("image/jpeg", "jpeg"),
        _ => ("image/png", "png"),
    };
    Ok(Output::bytes(buf.into_inner())
        .with_mime(mime)
        .with_meta("width", img.width())
        .with_meta("height", img.height())
        .with_meta("format", name))
}

fn side(
    args: &serde_json::Map<String, Value>,
    name: &str,
    default: Option<u32>,
) -> Result<u32, JobError> {
    match args.get(name) {
        None => default.ok_or_else(|| JobError::bad_argument(name, "is required")),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_SIDE as u64).contains(&n) => Ok(n as u32),
            _ => Err(JobError::bad_argument(
                name,
                format!("must be an integer from 1 to {MAX_SIDE}"),
            )),
        },
    }
}

/// One operation on an image, by capability name.
pub fn process(
    capability: &str,
    args: &serde_json::Map<String, Value>,
    input: &[u8],
) -> Result<Output, JobError> {
    let (img, in_format) = decode(input)?;
    let format = out_format(args, in_format)?;
    let out = match capability {
        "image.thumbnail" => {
            let size = side(args, "size", Some(128))?;
            img.thumbnail(size, size)
        }
        "image.resize" => {
            let (w, h) = (side(args, "width", None)?, side(args, "height", None)?);
            img.resize_exact(w, h, image::imageops::FilterType::Lanczos3)
        }
        "image.grayscale" => {
            DynamicImage::ImageRgba8(DynamicImage::ImageLuma8(img.to_luma8()).to_rgba8())
        }
        "image.blur" => {
            let sigma = match args.get("sigma") {
                None => 2.0,
                Some(v) => match v.as_f64() {
                    Some(s) if s > 0.0 && s <= 50.0 => s as f32,
                    _ => {
                        return Err(JobError::bad_argument(
                            "sigma",
                            "must be a number above 0 and at most 50",
                        ))
                    }
                },
            };
            img.blur(sigma)
        }
        other => {
            return Err(JobError::Failed(format!(
                "{other} is not an image capability"
            )))
        }
    };
    encode(&out, format)
}

/// Gap between cells of a contact sheet, and around them.
const SHEET_GAP: u32 = 8;

/// Lays images out in a grid (the reduce step of an image batch).
pub fn contact_sheet(
    args: &serde_json::Map<String, Value>,
    input: &[u8],
) -> Result<Output, JobError> {
    let list = fragments::decode(input).map_err(|e| JobError::bad_argument("input", e))?;
    if list.is_empty() {
        return Err(JobError::bad_argument(
            "input",
            "a contact sheet needs at least one image",
        ));
    }
    let mut images = Vec::with_capacity(list.len());
    for (i, f) in list.iter().enumerate() {
        let (img, _) = decode(&f.data).map_err(|e| match e {
            JobError::BadArguments { message, .. } => JobError::bad_argument(
                "input",
                format!(
                    "image {i} ({}): {message}",
                    f.name.as_deref().unwrap_or("unnamed")
                ),
            ),
            other => other,
        })?;
        images.push(img);
    }
    let largest = images
        .iter()
        .map(|i| i.width().max(i.height()))
        .max()
        .unwrap_or(1);
    let tile = match args.get("tile") {
        None => largest,
        Some(_) => side(args, "tile", None)?,
    };
    let n = images.len() as u32;
    let columns = match args.get("columns") {
        None => (f64::from(n).sqrt().ceil() as u32).max(1),
        Some(_) => side(args, "columns", None)?.min(n),
    };
    let rows = n.div_ceil(columns);
    let width = u64::from(columns) * u64::from(tile + SHEET_GAP) + u64::from(SHEET_GAP);
    let height = u64::from(rows) * u64::from(tile + SHEET_GAP) + u64::from(SHEET_GAP);
    if width > u64::from(MAX_SIDE) || height > u64::from(MAX_SIDE) {
        return Err(JobError::bad_argument(
            "tile",
            format!("a {columns}×{rows} grid of {tile} px cells is over {MAX_SIDE} px"),
        ));
    }
    let mut sheet =
        image::RgbaImage::from_pixel(width as u32, height as u32, image::Rgba([32, 32, 32, 255]));
    for (i, img) in images.iter().enumerate() {
        let img = if img.width() > tile || img.height() > tile {
            img.thumbnail(tile, tile)
        } else {
            img.clone()
        };
        let (col, row) = (i as u32 % columns, i as u32 / columns);
        let x = SHEET_GAP + col * (tile + SHEET_GAP) + (tile - img.width()) / 2;
        let y = SHEET_GAP + row * (tile + SHEET_GAP) + (tile - img.height()) / 2;
        image::imageops::overlay(&mut sheet, &img.to_rgba8(), i64::from(x), i64::from(y));
    }
    let names: Vec<Value> = list
        .iter()
        .map(|f| f.name.clone().map_or(Value::Null, Value::String))
        .collect();
    Ok(encode(&DynamicImage::ImageRgba8(sheet), ImageFormat::Png)?
        .with_meta("images", images.len())
        .with_meta("names", Value::Array(names)))
}

/// The arguments of the contact sheet, the reduce step of an image batch.
const SHEET_ARGS: [&str; 2] = ["columns", "tile"];
/// The arguments of the capabilities that make the images of a batch (its map steps).
const IMAGE_ARGS: [&str; 5] = ["format", "height", "sigma", "size", "width"];

/// The arguments `capability` accepts: its own, plus those of its partners in an image batch.
/// Every step of a map/reduce job carries the submission's arguments (docs/PROTOCOL.md §11.7),
/// so `image.thumbnail` gets the contact sheet's `columns` and the sheet gets `size`; each
/// ignores the other's. Any other argument is refused, naming it and listing these.
pub fn accepted_args(capability: &str) -> Vec<&'static str> {
    let own: &[&str] = match capability {
        "image.thumbnail" => &["size", "format"],
        "image.resize" => &["width", "height", "format"],
        "image.grayscale" => &["format"],
        "image.blur" => &["sigma", "format"],
        "image.contact-sheet" => &IMAGE_ARGS,
        _ => &[],
    };
    let mut all: Vec<&str> = own.iter().chain(SHEET_ARGS.iter()).copied().collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Adds the image capabilities to an agent.
pub fn register(builder: AgentBuilder) -> AgentBuilder {
    let sheet = "image.contact-sheet";
    let builder = builder.capability_args(
        sheet,
        None,
        &accepted_args(sheet),
        |ctx: JobContext| async move {
            let JobContext { args, input, .. } = ctx;
            tokio::task::spawn_blocking(move || contact_sheet(&args, &input))
                .await
                .map_err(|e| JobError::Failed(format!("image task failed: {e}")))?
        },
    );
    [
        "image.thumbnail",
        "image.resize",
        "image.grayscale",
        "image.blur",
    ]
    .into_iter()
    .fold(builder, |b, cap| {
        b.capability_args(
            cap,
            None,
            &accepted_args(cap),
            move |ctx: JobContext| async move {
                let JobContext {
                    capability,
                    args,
                    input,
                    ..
                } = ctx;
                let name = capability.to_string();
                tokio::task::spawn_blocking(move || process(&name, &args, &input))
                    .await
                    .map_err(|e| JobError::Failed(format!("image task failed: {e}")))?
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GenericImageView, Rgba, RgbaImage};
    use serde_json::json;

    /// A 200×100 test card: red left half, blue right half, a white square in the middle.
    fn card(format: ImageFormat) -> Vec<u8> {
        let img = RgbaImage::from_fn(200, 100, |x, y| {
            if (90..110).contains(&x) && (40..60).contains(&y) {
                Rgba([255, 255, 255, 255])
            } else if x < 100 {
                Rgba([220, 20, 30, 255])
            } else {
                Rgba([10, 40, 200, 255])
            }
        });
        let mut buf = Cursor::new(Vec::new());
        let img = DynamicImage::ImageRgba8(img);
        match format {
            ImageFormat::Jpeg => DynamicImage::ImageRgb8(img.to_rgb8())
                .write_to(&mut buf, format)
                .unwrap(),
            _ => img.write_to(&mut buf, format).unwrap(),
        }
        buf.into_inner()
    }

    fn args(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn load(out: &Output) -> DynamicImage {
        image::load_from_memory(&out.bytes).unwrap()
    }

    #[test]
    fn thumbnail_keeps_the_aspect_ratio_and_colours() {
        let out = process(
            "image.thumbnail",
            &args(json!({"size": 64})),
            &card(ImageFormat::Png),
        )
        .unwrap();
        let img = load(&out);
        assert_eq!(img.dimensions(), (64, 32));
        assert_eq!(
            (out.meta["width"].clone(), out.meta["height"].clone()),
            (json!(64), json!(32))
        );
        assert_eq!(out.mime.as_deref(), Some("image/png"));
        let left = img.get_pixel(5, 5);
        let right = img.get_pixel(58, 5);
        assert!(left[0] > 180 && left[2] < 80, "left stays red: {left:?}");
        assert!(
            right[2] > 160 && right[0] < 60,
            "right stays blue: {right:?}"
        );
    }

    #[test]
    fn resize_is_exact_and_can_change_format() {
        let out = process(
            "image.resize",
            &args(json!({"width": 50, "height": 70, "format": "jpeg"})),
            &card(ImageFormat::Png),
        )
        .unwrap();
        assert_eq!(image::guess_format(&out.bytes).unwrap(), ImageFormat::Jpeg);
        assert_eq!(load(&out).dimensions(), (50, 70));
        assert_eq!(out.mime.as_deref(), Some("image/jpeg"));
    }

    #[test]
    fn grayscale_has_equal_channels_and_keeps_brightness_order() {
        let out = process(
            "image.grayscale",
            &json!({}).as_object().cloned().unwrap(),
            &card(ImageFormat::Jpeg),
        )
        .unwrap();
        let img = load(&out).to_rgba8();
        assert_eq!(img.dimensions(), (200, 100));
        assert!(
            img.pixels().all(|p| p[0] == p[1] && p[1] == p[2]),
            "every pixel has R = G = B"
        );
        let white = img.get_pixel(100, 50)[0];
        let red = img.get_pixel(20, 20)[0];
        let blue = img.get_pixel(180, 20)[0];
        assert!(
            white > 240 && red > blue,
            "white {white} > red {red} > blue {blue}"
        );
    }

    #[test]
    fn blur_smooths_the_edge() {
        let input = card(ImageFormat::Png);
        let out = process("image.blur", &args(json!({"sigma": 4.0})), &input).unwrap();
        let img = load(&out).to_rgba8();
        // At the red/blue border the blurred image mixes both colours.
        let edge = img.get_pixel(100, 10);
        assert!(
            edge[0] > 60 && edge[2] > 60,
            "edge mixes red and blue: {edge:?}"
        );
        let far = img.get_pixel(10, 10);
        assert!(far[0] > 180, "far from the edge it stays red: {far:?}");
    }

    #[test]
    fn each_capability_accepts_its_arguments_and_its_batch_partners() {
        assert_eq!(
            accepted_args("image.thumbnail"),
            ["columns", "format", "size", "tile"]
        );
        assert!(!accepted_args("image.thumbnail").contains(&"width"));
        assert_eq!(
            accepted_args("image.resize"),
            ["columns", "format", "height", "tile", "width"]
        );
        assert_eq!(
            accepted_args("image.contact-sheet"),
            ["columns", "format", "height", "sigma", "size", "tile", "width"]
        );
    }

    #[test]
    fn bad_input_and_arguments_name_the_field() {
        let bad = |cap: &str, a: Value, input: &[u8]| match process(cap, &args(a), input) {
            Err(JobError::BadArguments { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(bad("image.thumbnail", json!({}), b"not an image"), "input");
        assert_eq!(bad("image.thumbnail", json!({}), b""), "input");
        assert_eq!(
            bad(
                "image.resize",
                json!({"width": 10}),
                &card(ImageFormat::Png)
            ),
            "height"
        );
        assert_eq!(
            bad(
                "image.resize",
                json!({"width": 0, "height": 5}),
                &card(ImageFormat::Png)
            ),
            "width"
        );
        assert_eq!(
            bad("image.blur", json!({"sigma": -1}), &card(ImageFormat::Png)),
            "sigma"
        );
        assert_eq!(
            bad(
                "image.thumbnail",
                json!({"format": "gif"}),
                &card(ImageFormat::Png)
            ),
            "format"
        );
    }

    /// A solid PNG of one colour.
    fn solid(w: u32, h: u32, c: [u8; 3]) -> Vec<u8> {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(w, h, image::Rgb(c)));
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, ImageFormat::Png).unwrap();
        buf.into_inner()
    }

    #[test]
    fn contact_sheet_lays_images_out_in_order() {
        use spine_protocol::Fragment;
        let colours = [
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [255, 255, 0],
            [0, 255, 255],
        ];
        let list: Vec<Fragment> = colours
            .iter()
            .enumerate()
            .map(|(i, c)| Fragment::new(solid(40, 20, *c)).with_name(format!("img{i}.png")))
            .collect();
        let out = contact_sheet(&args(json!({})), &fragments::encode(&list)).unwrap();
        // 5 images: a 3×2 grid of 40 px cells, 8 px gaps.
        let sheet = image::load_from_memory(&out.bytes).unwrap();
        assert_eq!((sheet.width(), sheet.height()), (3 * 48 + 8, 2 * 48 + 8));
        assert_eq!(out.meta["images"], 5);
        assert_eq!(out.meta["names"][4], "img4.png");
        // Each image sits centred in its cell: 40×20 in a 40×40 cell is 10 px down.
        for (i, c) in colours.iter().enumerate() {
            let (col, row) = (i as u32 % 3, i as u32 / 3);
            let (x, y) = (8 + col * 48, 8 + row * 48 + 10);
            let px = |dx: u32, dy: u32| sheet.get_pixel(x + dx, y + dy).0;
            assert_eq!(px(0, 0), [c[0], c[1], c[2], 255], "image {i} top left");
            assert_eq!(
                px(39, 19),
                [c[0], c[1], c[2], 255],
                "image {i} bottom right"
            );
            assert_eq!(
                sheet.get_pixel(x, y - 1).0,
                [32, 32, 32, 255],
                "above image {i}"
            );
        }
        // The sixth cell is empty background.
        assert_eq!(
            sheet.get_pixel(8 + 2 * 48 + 20, 8 + 48 + 20).0,
            [32, 32, 32, 255]
        );
        // Bad input names the image at fault.
        let mut bad = list.clone();
        bad[2].data = b"nope".to_vec();
        match contact_sheet(&args(json!({})), &fragments::encode(&bad)) {
            Err(JobError::BadArguments { field, message }) => {
                assert_eq!(field, "input");
                assert!(message.contains("image 2 (img2.png)"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            contact_sheet(&args(json!({})), b"[]"),
            Err(JobError::BadArguments { .. })
        ));
    }
}
