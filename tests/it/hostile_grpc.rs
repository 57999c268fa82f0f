//! The gRPC listener against clients that do not play by the rules, over a
//! raw HTTP/2 client (the `h2` crate).

use std::time::Duration;

use crate::helpers::*;

/// The server's SETTINGS after the handshake, as a raw client sees them:
/// the limit on streams it may open on one connection.
async fn advertised_streams(addr: std::net::SocketAddr) -> usize {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (_send, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // h2 assumes no limit until the server's SETTINGS arrive: drive the
    // connection until they have (10 s at most).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::select! {
            ended = &mut connection => panic!("the connection ended: {ended:?}"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let advertised = connection.max_concurrent_send_streams();
        if advertised != usize::MAX {
            return advertised;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no MAX_CONCURRENT_STREAMS in the server's SETTINGS"
        );
    }
}

#[tokio::test]
async fn the_stream_limit_is_advertised_in_settings() {
    let app = spawn_app().await;
    assert_eq!(advertised_streams(app.addr).await, 256, "the default");
    let app = spawn_app_with(&["--grpc-max-streams", "7"], |_| {}).await;
    assert_eq!(advertised_streams(app.addr).await, 7);
}
