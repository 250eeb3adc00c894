//! Encode and decode throughput of the wire formats: a typical property batch (10 updates) and link frames.
//!
//! Run with `cargo bench -p thingport-protocol --bench codec`. Results are reported per frame and as bytes/s.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use thingport_protocol::{
    ByteString, Frame, Limits, LinkDecoder, LinkFrame, Properties, PropertyUpdate, Quality, Value,
    link,
};

fn typical_batch() -> Frame {
    let names = [
        "temperature",
        "humidity",
        "pressure",
        "rpm",
        "running",
        "vibration",
        "firmware",
        "setpoint",
        "alarm",
        "uptime",
    ];
    let updates = names
        .iter()
        .enumerate()
        .map(|(i, name)| PropertyUpdate {
            name: ByteString::from_static(name),
            timestamp_ms: 1_764_000_000_000 + i as u64 * 10,
            quality: Quality::Good,
            value: match i % 4 {
                0 => Value::Float(20.5 + i as f64),
                1 => Value::Int(1_500 + i as i64),
                2 => Value::Bool(i % 3 == 0),
                _ => Value::from_static("v1.4.2"),
            },
        })
        .collect();
    Frame::Properties(Properties { seq: 123_456, updates })
}

fn device_frames(c: &mut Criterion) {
    let frame = typical_batch();
    let encoded = frame.to_bytes();
    let limits = Limits::DEFAULT;
    let mut group = c.benchmark_group("properties_batch_10");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("encode", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            buf.clear();
            black_box(&frame).encode(&mut buf);
            black_box(buf.len())
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| Frame::decode(black_box(encoded.clone()), &limits))
    });
    group.finish();
}

fn link_frames(c: &mut Criterion) {
    let device = typical_batch().to_bytes();
    let thing = "pump-0042";
    const BATCH: usize = 64;
    let mut wire = BytesMut::new();
    for session in 0..BATCH as u64 {
        link::put_upstream_header(&mut wire, session, 1, thing, device.len());
        wire.extend_from_slice(&device);
    }
    let wire = wire.freeze();
    let decoder = LinkDecoder::new(Limits::DEFAULT);
    let mut group = c.benchmark_group("link_upstream_x64");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function("encode", |b| {
        let mut buf = BytesMut::with_capacity(wire.len());
        b.iter(|| {
            buf.clear();
            for session in 0..BATCH as u64 {
                link::put_upstream_header(&mut buf, session, 1, thing, device.len());
                buf.extend_from_slice(black_box(&device));
            }
            black_box(buf.len())
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&black_box(&wire)[..]);
            let mut n = 0;
            while let Ok(Some(LinkFrame::Upstream { frame, .. })) = decoder.decode(&mut buf) {
                n += frame.len();
            }
            n
        })
    });
    group.finish();

    let stored: Bytes = LinkFrame::Stored { session_id: 77, seq: 123_456 }.to_framed_bytes();
    let mut group = c.benchmark_group("link_stored");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&black_box(&stored)[..]);
            decoder.decode(&mut buf)
        })
    });
    group.finish();
}

criterion_group!(benches, device_frames, link_frames);
criterion_main!(benches);
