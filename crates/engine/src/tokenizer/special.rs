//! Special token ids: the ones the metadata names, and llama.cpp's detection of EOT/EOM/FIM
//! tokens by their text.

use super::{ATTR_CONTROL, ATTR_NORMAL, ATTR_USER_DEFINED};

/// Special token ids read from `tokenizer.ggml.*_token_id` (llama.cpp's `special_*_id`).
#[derive(Default)]
pub(super) struct SpecialIds {
    pub(super) bos: Option<u32>,
    pub(super) eos: Option<u32>,
    pub(super) eot: Option<u32>,
    pub(super) eom: Option<u32>,
    pub(super) pad: Option<u32>,
    pub(super) fim_pre: Option<u32>,
    pub(super) fim_suf: Option<u32>,
    pub(super) fim_mid: Option<u32>,
    pub(super) fim_pad: Option<u32>,
    pub(super) fim_rep: Option<u32>,
    pub(super) fim_sep: Option<u32>,
}

/// llama.cpp's auto-detection of EOT/EOM/FIM tokens by their text and its EOG set.
/// Marks the detected tokens as control, as llama.cpp does. Returns the sorted EOG ids.
pub(super) fn detect_special_tokens(
    tokens: &[String],
    attrs: &mut [u16],
    sp: &mut SpecialIds,
) -> Vec<u32> {
    const EOT: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    ];
    const EOM: &[&str] = &["<|eom_id|>"];
    const FIM_PRE: &[&str] = &[
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ];
    const FIM_SUF: &[&str] = &[
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ];
    const FIM_MID: &[&str] = &[
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ];
    const FIM_PAD: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
    const FIM_REP: &[&str] = &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ];
    const FIM_SEP: &[&str] = &["<|file_sep|>"];
    const EOG: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    ];

    for (id, text) in tokens.iter().enumerate() {
        let id32 = id as u32;
        let text = text.as_str();
        let slots: [(&mut Option<u32>, &[&str]); 8] = [
            (&mut sp.eot, EOT),
            (&mut sp.eom, EOM),
            (&mut sp.fim_pre, FIM_PRE),
            (&mut sp.fim_suf, FIM_SUF),
            (&mut sp.fim_mid, FIM_MID),
            (&mut sp.fim_pad, FIM_PAD),
            (&mut sp.fim_rep, FIM_REP),
            (&mut sp.fim_sep, FIM_SEP),
        ];
        for (slot, names) in slots {
            if slot.is_none() && names.contains(&text) {
                *slot = Some(id32);
                attrs[id] |= ATTR_CONTROL;
            }
        }
    }

    let mut eog: Vec<u32> = Vec::new();
    eog.extend(sp.fim_pad);
    eog.extend(sp.fim_rep);
    eog.extend(sp.fim_sep);
    for (id, text) in tokens.iter().enumerate() {
        if EOG.contains(&text.as_str()) {
            eog.push(id as u32);
            attrs[id] |= ATTR_CONTROL;
        }
    }
    // gpt-oss: these are always rendered.
    for (id, text) in tokens.iter().enumerate() {
        if matches!(
            text.as_str(),
            "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
        ) {
            attrs[id] = ATTR_USER_DEFINED;
        }
    }
    eog.extend(sp.eos);
    eog.extend(sp.eot);
    eog.extend(sp.eom);
    eog.sort_unstable();
    eog.dedup();

    let find =
        |eog: &[u32], name: &str| eog.iter().copied().find(|&id| tokens[id as usize] == name);
    // o200k_harmony / solar-open: "<|end|>" is not EOG when "<|return|>" and "<|call|>" are.
    let has = |eog: &[u32], name: &str| find(eog, name).is_some();
    if ((has(&eog, "<|return|>") && has(&eog, "<|call|>"))
        || ((has(&eog, "<|call|>") || has(&eog, "<|calls|>")) && has(&eog, "<|flush|>")))
        && has(&eog, "<|end|>")
    {
        if let Some(end) = find(&eog, "<|end|>") {
            eog.retain(|&id| id != end);
            attrs[end as usize] = ATTR_USER_DEFINED;
        }
    }
    // gemma4 / paddleocr: "</s>" is not EOG when "<|tool_response>" is.
    if has(&eog, "<|tool_response>") {
        if let Some(s) = find(&eog, "</s>") {
            eog.retain(|&id| id != s);
            attrs[s as usize] = ATTR_NORMAL;
        }
    }
    eog
}
