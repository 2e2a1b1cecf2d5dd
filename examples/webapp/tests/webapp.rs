//! The web app against a real farm: embedded server, dispatcher, an image agent; a browser's
//! requests made with an HTTP client.

use std::io::Cursor;
use std::time::Duration;

use serde_json::Value;
use spine_agent::Agent;
use spine_integration::farm::{start_http_dispatcher, wait_for_agents};
use spine_integration::{TestServer, PATIENCE};

async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_follow_and_fetch_a_thumbnail() {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, api_base) = start_http_dispatcher(&server, dir.path(), "").await;
    let cfg = spine_integration::farm::agent_config(&server, 1, "");
    let agent = spine_example_image::register(Agent::builder(cfg))
        .build()
        .unwrap();
    let agent = spine_integration::farm::run_agent(agent);
    wait_for_agents(&api_base, "image.thumbnail", 1).await;

    // The web app on a free port, talking to that dispatcher.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = format!("http://{}", listener.local_addr().unwrap());
    let router = spine_example_webapp::router(spine_client::Client::new(&api_base, None).unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    let page = http
        .get(format!("{app}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<input type=\"file\""), "{page}");

    // A 300×100 PNG: left third green, the rest white.
    let img = image::RgbImage::from_fn(300, 100, |x, _| {
        if x < 100 {
            image::Rgb([0, 200, 0])
        } else {
            image::Rgb([255, 255, 255])
        }
    });
    let mut png = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let (status, body) = send(
        http.post(format!("{app}/thumbnails?size=60"))
            .header("content-type", "image/png")
            .body(png.into_inner()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();

    let deadline = tokio::time::Instant::now() + PATIENCE;
    let job = loop {
        let (status, job) = send(http.get(format!("{app}/thumbnails/{id}"))).await;
        assert_eq!(status, 200, "{job}");
        if job["state"] == "succeeded" {
            break job;
        }
        assert!(
            !["failed", "cancelled", "timed-out"].contains(&job["state"].as_str().unwrap_or("")),
            "{job}"
        );
        assert!(tokio::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (job["width"].as_u64(), job["height"].as_u64()),
        (Some(60), Some(20))
    );
    let resp = http
        .get(format!("{app}/thumbnails/{id}/image"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "image/png");
    let thumb = image::load_from_memory(&resp.bytes().await.unwrap())
        .unwrap()
        .to_rgb8();
    assert_eq!(thumb.dimensions(), (60, 20));
    assert_eq!(thumb.get_pixel(5, 10).0, [0, 200, 0], "the green third");
    assert_eq!(thumb.get_pixel(50, 10).0, [255, 255, 255], "the white rest");

    // Errors reach the page as JSON with a reason.
    let (status, body) = send(http.post(format!("{app}/thumbnails"))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("choose an image first"))
    );
    let (status, body) = send(
        http.post(format!("{app}/thumbnails?size=5000"))
            .header("content-type", "image/png")
            .body("x"),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("size must be 16 to 1024"))
    );
    let (status, body) = send(http.get(format!("{app}/thumbnails/no-such-job"))).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no job no-such-job"),
        "{body}"
    );
    // Not an image: the agent's error, through the dispatcher, on the page.
    let (_, body) = send(
        http.post(format!("{app}/thumbnails"))
            .header("content-type", "image/png")
            .body("not a png"),
    )
    .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, job) = send(http.get(format!("{app}/thumbnails/{id}"))).await;
        if job["state"] == "failed" {
            assert!(
                job["error"]
                    .as_str()
                    .unwrap()
                    .contains("not a PNG or JPEG image"),
                "{job}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.stop();
    dispatcher.stop();
}
