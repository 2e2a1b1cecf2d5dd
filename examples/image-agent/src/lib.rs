//! Example Spine agent: image processing with the `image` crate.
//!
//! Capabilities (input: a PNG or JPEG image; output: the same format unless `format` says
//! otherwise):
//!
//! - `image.thumbnail`: fit inside `size`×`size` (default 128), aspect ratio kept;
//! - `image.resize`: exactly `width`×`height` (both required);
//! - `image.grayscale`: luminance only (output pixels have R = G = B);
//! - `image.blur`: Gaussian blur of strength `sigma` (default 2.0, at most 50).
//!
//! Optional argument `format`: `png` or `jpeg`. Result metadata: `width`, `height`, `format`.
//! The work runs on the blocking thread pool so the agent's connection task is never held up.
//! Images larger than 64 KiB travel as blobs (docs/PROTOCOL.md §13) without anything to do here.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat};
use serde_json::Value;
use spine_agent::{AgentBuilder, JobContext, JobError, Output};

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

/// Adds the four image capabilities to an agent.
pub fn register(builder: AgentBuilder) -> AgentBuilder {
    [
        "image.thumbnail",
        "image.resize",
        "image.grayscale",
        "image.blur",
    ]
    .into_iter()
    .fold(builder, |b, cap| {
        b.capability(cap, None, move |ctx: JobContext| async move {
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
        })
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
}
