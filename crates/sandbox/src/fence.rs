//! The fenced code blocks of a Markdown reply.

/// One fenced block (```` ``` ````) of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencedBlock {
    /// The first word of the info string, lowercase (`python` for ```` ```python title ````);
    /// empty for a bare fence.
    pub lang: String,
    /// The lines between the fences, as written (indentation kept).
    pub code: String,
}

/// Every fenced block of `text`, in order. A fence opens on a line that starts (after
/// indentation) with ```` ``` ```` and closes on the next such line; a line that *ends* with
/// ```` ``` ```` also closes it, its text before the fence kept (small models write
/// `return x```). A block left open (an answer cut off at the token limit) runs to the end.
pub fn fenced_blocks(text: &str) -> Vec<FencedBlock> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, Vec<&str>)> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        match open.take() {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    let lang = info
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_lowercase();
                    open = Some((lang, Vec::new()));
                }
            }
            Some((lang, mut lines)) => {
                if trimmed.starts_with("```") {
                    blocks.push(block(lang, &lines));
                } else if let Some(before) = line.trim_end().strip_suffix("```") {
                    lines.push(before);
                    blocks.push(block(lang, &lines));
                } else {
                    lines.push(line);
                    open = Some((lang, lines));
                }
            }
        }
    }
    if let Some((lang, lines)) = open {
        blocks.push(block(lang, &lines));
    }
    blocks
}

fn block(lang: String, lines: &[&str]) -> FencedBlock {
    FencedBlock {
        lang,
        code: lines.join("\n"),
    }
}

/// Whether a block's language tag means Python (an untagged block counts).
pub fn is_python(lang: &str) -> bool {
    matches!(lang, "" | "python" | "py" | "python3" | "py3")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn langs_and_code(text: &str) -> Vec<(String, String)> {
        fenced_blocks(text)
            .into_iter()
            .map(|b| (b.lang, b.code))
            .collect()
    }

    #[test]
    fn blocks_with_their_language_in_order() {
        let text =
            "Usage:\n```\nf(1)\n```\nThen:\n```Python title=\"x\"\ndef f(x):\n    return x\n```\n";
        assert_eq!(
            langs_and_code(text),
            vec![
                (String::new(), "f(1)".to_owned()),
                ("python".to_owned(), "def f(x):\n    return x".to_owned()),
            ]
        );
    }

    #[test]
    fn indented_fences_keep_the_code_as_written() {
        let text = "1. Code:\n   ```python\n   def f(x):\n       return x\n   ```";
        assert_eq!(
            langs_and_code(text),
            vec![(
                "python".to_owned(),
                "   def f(x):\n       return x".to_owned()
            )]
        );
    }

    #[test]
    fn a_block_cut_off_runs_to_the_end_and_a_fence_may_close_a_line() {
        assert_eq!(
            langs_and_code("```py\ndef f(x):\n    return x"),
            vec![("py".to_owned(), "def f(x):\n    return x".to_owned())]
        );
        assert_eq!(
            langs_and_code("```python\ndef f(x):\n    return x```\nDone."),
            vec![("python".to_owned(), "def f(x):\n    return x".to_owned())]
        );
        assert!(fenced_blocks("no code here").is_empty());
        assert_eq!(
            langs_and_code("```python\n```"),
            vec![("python".to_owned(), String::new())]
        );
    }

    #[test]
    fn python_tags() {
        for tag in ["", "python", "py", "python3", "py3"] {
            assert!(is_python(tag), "{tag}");
        }
        for tag in ["rust", "bash", "javascript"] {
            assert!(!is_python(tag), "{tag}");
        }
    }
}
