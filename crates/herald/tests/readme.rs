//! The README's Rust snippets are excerpts of the compiled examples: each block after a
//! `<!-- from crates/herald/examples/NAME.rs -->` line must appear in that file, line by line
//! and in order, so a snippet cannot drift from code that builds.

use std::path::Path;

#[test]
fn readme_snippets_are_taken_from_the_examples() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let mut checked = 0;
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(path) = line
            .trim()
            .strip_prefix("<!-- from ")
            .and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```rust"),
            "a rust block follows the marker for {path}"
        );
        let source =
            std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut source_lines = source.lines().map(str::trim);
        for snippet_line in lines.by_ref().take_while(|l| !l.starts_with("```")) {
            let wanted = snippet_line.trim();
            if wanted.is_empty() || wanted == "// ..." {
                continue;
            }
            assert!(
                source_lines.any(|l| l == wanted),
                "README line {wanted:?} is not in {path} (or not in this order)"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 3,
        "the README's writing, consuming and sidecar snippets are checked"
    );
}
