//! The documented protocol and the code agree: every error code the code can
//! send is in docs/protocol.md's table and in the proto schema's enum, and
//! every close code the server sends is documented.

use runcast_core::{CloseCode, ErrorCode};

fn read(rel: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_error_code_is_documented_and_in_the_schema() {
    let doc = read("docs/protocol.md");
    let proto = read("proto/runcast/v1/protocol.proto");
    for code in ErrorCode::ALL {
        let row = format!("| `{}` | {}", code.as_str(), code.http_status());
        assert!(
            doc.contains(&row),
            "docs/protocol.md lacks the row starting {row:?}"
        );
        assert!(
            proto.contains(&format!("  {} = ", code.as_str())),
            "protocol.proto lacks ErrorCode {}",
            code.as_str()
        );
    }
}

#[test]
fn every_close_code_is_documented() {
    let doc = read("docs/protocol.md");
    for c in CloseCode::ALL {
        assert!(
            doc.contains(&format!("| {} |", c.code())),
            "close code {} is not in docs/protocol.md",
            c.code()
        );
    }
    assert!(
        CloseCode::should_resume(4000)
            && CloseCode::should_resume(1001)
            && CloseCode::should_resume(1006)
    );
    assert!(
        !CloseCode::should_resume(1008)
            && !CloseCode::should_resume(4401)
            && !CloseCode::should_resume(1000)
    );
}
