//! A link's byte stream, split into two reads at a point the input chooses: link frames, and the device frames
//! they carry. Whatever decodes must re-encode to a frame that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thingport_protocol::{BytesMut, Frame, Limits, LinkDecoder, LinkFrame};

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let split = usize::from(split).min(data.len());
    let decoder = LinkDecoder::new(Limits::DEFAULT);
    let mut buf = BytesMut::new();
    for part in [&data[..split], &data[split..]] {
        buf.extend_from_slice(part);
        while let Ok(Some(frame)) = decoder.decode(&mut buf) {
            let mut again = BytesMut::from(&frame.to_framed_bytes()[..]);
            assert_eq!(decoder.decode(&mut again).ok().flatten().as_ref(), Some(&frame));
            if let LinkFrame::Upstream { frame, .. } | LinkFrame::Downstream { frame, .. } = frame {
                let _ = Frame::decode(frame, &Limits::DEFAULT);
            }
        }
    }
});
