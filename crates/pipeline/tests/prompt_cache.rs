#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The prompt cache across a ring (issue #17): a conversation's next turn resumes the kept
//! prompt on the head's stage and on every peer's, and answers token for token as a ring
//! without the cache and as the single process do; a stage that let its copy go makes the
//! head compute the prompt again, with the same answer. Real SmolLM2, stage servers as tasks
//! of this process on 127.0.0.1.

use std::net::SocketAddr;

use shoal_engine::{ChatMessage, GenerateParams, Model, SamplingParams};
use shoal_pipeline::{
    PeerStage, Pipeline, PipelineConfig, RingRequest, StageServer, StageServerConfig,
};
use tokio::net::TcpListener;

mod common;
use common::model_path;

const MAX_TOKENS: usize = 24;

/// A stage server keeping `kept_bytes` of ended sessions' caches.
async fn stage(kept_bytes: usize) -> (StageServer, SocketAddr) {
    let dir = model_path().parent().unwrap().to_path_buf();
    let mut config = StageServerConfig::new(dir);
    config.prompt_cache_bytes = kept_bytes;
    let server = StageServer::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.clone().serve(listener, std::future::pending()));
    (server, addr)
}

/// A head on layers 0..10 with a prompt cache, and stages on 10..20 and 20..30 keeping
/// `kept_bytes` each.
async fn ring(kept_bytes: [usize; 2]) -> (Pipeline, Vec<StageServer>) {
    let mut servers = Vec::new();
    let mut peers = Vec::new();
    for (layers, bytes) in [(10..20, kept_bytes[0]), (20..30, kept_bytes[1])] {
        let (server, addr) = stage(bytes).await;
        servers.push(server);
        peers.push(PeerStage { addr, layers });
    }
    let mut config = PipelineConfig::new(model_path(), 0..10, peers);
    config.prompt_cache_bytes = 64 << 20;
    (Pipeline::connect(config).await.unwrap(), servers)
}

fn turns(model: &Model) -> (Vec<u32>, impl Fn(&str) -> Vec<u32> + '_) {
    let system = ChatMessage {
        role: "system".into(),
        content: "You are a helpful assistant who answers briefly. ".repeat(8),
    };
    let render = move |messages: &[ChatMessage]| {
        model
            .encode_prompt(&model.render_chat(messages).unwrap())
            .unwrap()
    };
    let first = render(&[
        system.clone(),
        ChatMessage {
            role: "user".into(),
            content: "Name a primary colour.".into(),
        },
    ]);
    let second = move |answer: &str| {
        render(&[
            system.clone(),
            ChatMessage {
                role: "user".into(),
                content: "Name a primary colour.".into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: answer.into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "And another one?".into(),
            },
        ])
    };
    (first, second)
}

fn single_process(model: &Model, prompt: &[u32]) -> Vec<u32> {
    let params = GenerateParams {
        max_tokens: MAX_TOKENS,
        ..GenerateParams::default()
    };
    let mut g = model.generate(prompt.to_vec(), params).unwrap();
    while g.next_step().unwrap().is_some() {}
    g.generated().to_vec()
}

async fn ask(pipeline: &Pipeline, prompt: &[u32], cache_prompt: bool) -> (Vec<u32>, usize) {
    let greedy = SamplingParams::greedy();
    let request = RingRequest {
        cache_prompt,
        ..RingRequest::new(prompt, &greedy, MAX_TOKENS)
    };
    let answer = pipeline.run(request, |_, _| true).await.unwrap();
    (answer.tokens, answer.cached_tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_turn_resumes_on_every_stage_and_answers_the_same() {
    let model = Model::load(model_path(), |_, _| {}).unwrap();
    let (pipeline, servers) = ring([64 << 20, 64 << 20]).await;
    let (first, second_for) = turns(&model);

    let (answer, cached) = ask(&pipeline, &first, true).await;
    assert_eq!(cached, 0);
    assert_eq!(answer, single_process(&model, &first));
    // Kept on the head and on both stages.
    assert_eq!(pipeline.prompt_cache_usage().0, 1);
    for s in &servers {
        assert_eq!(s.prompt_cache_usage().0, 1);
    }

    let text = model.tokenizer().decode(&answer, true).unwrap();
    let second = second_for(&text);
    let (resumed, cached) = ask(&pipeline, &second, true).await;
    assert!(
        cached + 16 >= first.len() && cached < second.len(),
        "{cached} of {} resumed (first turn {})",
        second.len(),
        first.len()
    );
    let (fresh, none) = ask(&pipeline, &second, false).await;
    assert_eq!(none, 0);
    assert_eq!(
        resumed, fresh,
        "the ring answers differently with the cache"
    );
    assert_eq!(resumed, single_process(&model, &second));
    // The second turn superseded the first everywhere; the opted-out run kept nothing.
    assert_eq!(pipeline.prompt_cache_usage().0, 1);
    for s in &servers {
        assert_eq!(
            s.prompt_cache_usage().0,
            1,
            "a stage kept a superseded prompt"
        );
    }
}

/// The last stage keeps nothing: the head's resume is refused there (`PREFIX_GONE`), and the
/// head runs the prompt again from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_without_the_kept_prompt_makes_the_head_compute_it() {
    let model = Model::load(model_path(), |_, _| {}).unwrap();
    let (pipeline, servers) = ring([64 << 20, 0]).await;
    let (first, second_for) = turns(&model);
    let (answer, _) = ask(&pipeline, &first, true).await;
    assert_eq!(servers[1].prompt_cache_usage().0, 0);
    let text = model.tokenizer().decode(&answer, true).unwrap();
    let second = second_for(&text);
    let (again, cached) = ask(&pipeline, &second, true).await;
    assert_eq!(cached, 0, "nothing can be resumed when a stage has nothing");
    assert_eq!(again, single_process(&model, &second));
    // The head forgot the prompt the stage lost, and kept the new one.
    assert_eq!(pipeline.prompt_cache_usage().0, 1);
}
