//! Encode and decode of a typical ~200-byte event envelope, in both codecs.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p tunnel-proto --bench codec`).
//! Throughput is reported in elements (messages) per second on one core. Decoding goes
//! the transport's way (`decode_text` for JSON's text frames, with the UTF-8 check the
//! WebSocket layer makes; `decode_boxed` for MessagePack).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tunnel_proto::messages::{Event, Gvr, ObjectRef, TypedMessage};
use tunnel_proto::{Codec, Envelope, Format, FrameKind, Limits};

/// Decodes as the transport's receiver does: a text frame (whose UTF-8 the WebSocket
/// layer has checked) through `decode_text`, a binary one through `decode_boxed`.
fn receive(codec: &dyn Codec, frame: &Bytes, limits: &Limits) -> Box<Envelope> {
    match codec.frame_kind() {
        FrameKind::Text => {
            let text = std::str::from_utf8(frame).expect("utf8");
            codec.decode_text(frame, text, limits)
        }
        FrameKind::Binary => codec.decode_boxed(frame, limits),
    }
    .expect("decode")
}

fn event() -> Event {
    Event {
        event_type: "Normal".into(),
        reason: "ScalingReplicaSet".into(),
        message: "Scaled up replica set web-7d4b9c8f5 to 3".into(),
        regarding: Some(ObjectRef {
            gvr: Gvr::new("apps", "v1", "deployments"),
            namespace: Some("default".into()),
            name: "web".into(),
        }),
    }
}

fn codec(c: &mut Criterion) {
    let limits = Limits::default();
    for format in [Format::MsgPack, Format::Json] {
        let codec = format.codec();
        let env = event()
            .to_envelope(1_234_567, 1_764_000_000_000, format)
            .expect("envelope")
            .with_seq(1_234_567)
            .with_ack(7_654_321);
        let mut buf = Vec::with_capacity(512);
        codec.encode(&env, &mut buf).expect("encode");
        let frame = Bytes::from(buf.clone());
        eprintln!("{format}: event envelope is {} bytes", frame.len());

        let mut group = c.benchmark_group(format!("envelope/{format}"));
        group.throughput(Throughput::Elements(1));
        group.bench_function("encode", |b| {
            b.iter(|| {
                buf.clear();
                codec.encode(black_box(&env), &mut buf).expect("encode");
                black_box(buf.len())
            })
        });
        group.bench_function("decode", |b| {
            b.iter(|| black_box(receive(codec, black_box(&frame), &limits)))
        });
        group.bench_function("encode+decode", |b| {
            b.iter(|| {
                buf.clear();
                codec.encode(black_box(&env), &mut buf).expect("encode");
                // A write pump hands the encoded frame over as Bytes.
                let frame = Bytes::copy_from_slice(&buf);
                black_box(receive(codec, &frame, &limits))
            })
        });
        group.bench_function("decode+typed payload", |b| {
            b.iter(|| {
                let env = receive(codec, black_box(&frame), &limits);
                black_box(Event::from_envelope(&env).expect("payload"))
            })
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = codec
}
criterion_main!(benches);
