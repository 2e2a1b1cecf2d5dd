//! The browser harness (spine_integration::browser) on a page of its own, with no farm: what
//! the console's tests (console.rs) rely on, checked where a failure can only be the harness's.

use std::time::Duration;

use serde_json::json;
use spine_integration::browser::Browser;

/// The harness itself, on a page of its own (no farm): it waits for an element a script adds
/// later, types and clicks, reads text and runs scripts, saves a screenshot of the window's
/// size, and a selector that never appears fails naming the selector and the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_harness_waits_types_clicks_and_names_what_is_missing() {
    const PAGE: &str = r#"<!doctype html><html><head><title>harness</title></head><body>
<label for="name">Name</label><input id="name"><button id="go" type="button">Go</button>
<p id="out"></p>
<script>
setTimeout(() => { const p = document.createElement("p"); p.id = "late"; p.textContent = "arrived"; document.body.append(p); }, 300);
document.getElementById("go").addEventListener("click", () => {
  document.getElementById("out").textContent = "hello " + document.getElementById("name").value;
});
</script></body></html>"#;
    let Some(b) = Browser::start().await else {
        return;
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback listener");
    let url = format!(
        "http://{}/page",
        listener.local_addr().expect("its address")
    );
    let app = axum::Router::new().route(
        "/page",
        axum::routing::get(|| async { axum::response::Html(PAGE) }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    b.goto(&url).await;
    assert_eq!(b.text("#late").await, "arrived");
    b.fill("#name", "spine").await;
    b.click("#go").await;
    assert_eq!(b.text("#out").await, "hello spine");
    let title = b.execute("return document.title;", vec![]).await;
    assert_eq!(title, "harness");
    let shot = b.screenshot("harness").await;
    let png = image::open(&shot).expect("a PNG screenshot");
    let inner = b
        .execute("return [window.innerWidth, window.innerHeight];", vec![])
        .await;
    assert_eq!(
        json!([png.width(), png.height()]),
        inner,
        "{}",
        shot.display()
    );
    assert!(shot.starts_with(spine_integration::browser::screenshot_dir()));

    let missing = std::panic::AssertUnwindSafe(b.wait_for("#never", Duration::from_millis(300)));
    let err = futures::FutureExt::catch_unwind(missing)
        .await
        .err()
        .and_then(|p| p.downcast_ref::<String>().cloned())
        .expect("waiting for #never fails with a message");
    assert!(
        err.contains("\"#never\"") && err.contains(&url),
        "the error names the selector and the page: {err}"
    );

    b.close().await;
    server.abort();
}
