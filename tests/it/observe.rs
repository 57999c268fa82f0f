//! What operators see of each RPC: the usual gRPC server metrics (gRPC and
//! Connect counted alike), the build's version, and a log that is not
//! drowned by health probes.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use kongtie_gateway::proto::CreateJsapiOrderRequest;

use crate::helpers::{Binary, admin_metrics, grpcurl, sample, spawn_app};

const TOKEN: &str =
    r#"{grpc_type="unary",grpc_service="kongtie.v1.Auth",grpc_method="GetAccessToken"}"#;

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn every_rpc_is_counted_by_method_and_code_for_grpc_and_connect_alike() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.access_token().await.unwrap();
    }
    let url = format!("http://{}/kongtie.v1.Auth/GetAccessToken", app.addr);
    let nope = format!("http://{}/kongtie.v1.Auth/NoSuchMethod", app.addr);
    tokio::task::spawn_blocking(move || {
        for _ in 0..2 {
            let out = curl(&["-H", "content-type: application/json", "-d", "{}", &url]);
            assert!(out.contains("accessToken"), "{out}");
        }
        // A gRPC call to a path nobody serves (HTTP/2, as gRPC is).
        curl(&[
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            "",
            &nope,
        ]);
    })
    .await
    .unwrap();
    let refused = app
        .payment()
        .await
        .create_jsapi_order(CreateJsapiOrderRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let m = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(
        sample(&m, &format!("grpc_server_started_total{TOKEN}")),
        5.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"grpc_server_handled_total{grpc_type="unary",grpc_service="kongtie.v1.Auth",grpc_method="GetAccessToken",grpc_code="OK"}"#
        ),
        5.0
    );
    assert_eq!(
        sample(&m, &format!("grpc_server_handling_seconds_count{TOKEN}")),
        5.0
    );
    assert_eq!(
        sample(
            &m,
            r#"grpc_server_handled_total{grpc_type="unary",grpc_service="kongtie.v1.Payment",grpc_method="CreateJsapiOrder",grpc_code="InvalidArgument"}"#
        ),
        1.0
    );
    // An unknown path is one `unknown` series, however many are tried.
    assert_eq!(
        sample(
            &m,
            r#"grpc_server_handled_total{grpc_type="unknown",grpc_service="unknown",grpc_method="unknown",grpc_code="Unimplemented"}"#
        ),
        1.0,
        "{m}"
    );
    assert!(!m.contains("NoSuchMethod"));
    assert_eq!(
        sample(
            &m,
            &format!(
                "kongtie_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
}

#[test]
fn health_checks_and_reflection_stay_out_of_the_info_log_and_rpcs_do_not() {
    let bin = Binary::start(&["serve", "--sandbox", "--sandbox-addr", "127.0.0.1:0"]);
    let grpcurl = |args: &[&str]| {
        let out = Command::new(grpcurl())
            .args(["-plaintext", "-max-time", "10"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for _ in 0..3 {
        grpcurl(&[&bin.grpc, "grpc.health.v1.Health/Check"]);
        grpcurl(&[&bin.grpc, "list"]);
    }
    grpcurl(&[&bin.grpc, "kongtie.v1.Auth/GetAccessToken"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = bin.log.lock().unwrap().clone();
        if log
            .iter()
            .any(|l| l.contains("rpc finished") && l.contains("GetAccessToken"))
        {
            break log;
        }
        assert!(Instant::now() < deadline, "no line for the RPC: {log:#?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let line = log
        .iter()
        .find(|l| l.contains("rpc finished") && l.contains("GetAccessToken"))
        .unwrap();
    assert!(line.contains("INFO") && line.contains("code=OK"), "{line}");
    assert!(line.contains("latency_us="), "{line}");
    assert!(!line.contains("SBXAT_"), "no token in the log: {line}");
    let noisy: Vec<_> = log
        .iter()
        .filter(|l| l.contains("grpc.health") || l.contains("ServerReflection"))
        .collect();
    assert!(noisy.is_empty(), "{noisy:#?}");
    assert!(
        log.iter().any(|l| l.contains("kongtie-gateway starting")
            && l.contains(&format!("version={}", env!("CARGO_PKG_VERSION")))),
        "the version at start-up: {log:#?}"
    );
}
