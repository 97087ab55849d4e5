//! The `claude` executor with the real Claude Code CLI (installed into
//! `tests/clients` by `scripts/install-test-clients`) talking to a stand-in
//! model API on loopback: what a worker sees when the CLI succeeds, when the
//! model API fails, when the CLI is missing, runs out of turns or time, and
//! what the CLI gets to see of the worker.

mod helpers;

use std::time::Duration;

use claudecluster_consumer::executor::claude::{ClaudeExecutor, HOME_DIR};
use claudecluster_consumer::executor::{ExecError, Executor};
use claudecluster_testkit::model_api::{API_KEY, answer_for};
use helpers::{GENEROUS, Harness, failure, processes_in, quoted, task, wait_until_no_processes_in};

#[tokio::test]
async fn answers_with_the_model_and_reports_cost_turns_and_session() {
    let mut h = Harness::start().await;
    h.settings.model = Some("claude-stand-in-model".into());
    let prompt = format!("Summarise the queue {}", uuid::Uuid::new_v4());

    let result = h.run(&prompt).await.expect("a successful run");

    assert_eq!(result.executor, "claude");
    assert!(result.output.contains(&answer_for(&prompt)), "{result:?}");
    assert_eq!(result.exit_code, Some(0));
    assert_eq!(result.num_turns, Some(1));
    assert!(result.cost_usd.is_some_and(|c| c > 0.0), "{result:?}");
    let session = result.session_id.as_deref().expect("a session id");
    assert!(uuid::Uuid::parse_str(session).is_ok(), "{session}");

    // The prompt went over standard input, the settings on the command line.
    let calls = h.api.recorded();
    assert!(!calls.is_empty());
    assert_eq!(calls[0].prompt.trim(), prompt);
    assert_eq!(calls[0].model.as_deref(), Some("claude-stand-in-model"));
    assert_eq!(calls[0].api_key.as_deref(), Some(API_KEY));
    // The CLI wrote its state under the attempt's own HOME.
    assert!(h.work_dir.join(HOME_DIR).join(".claude.json").exists());
}

#[tokio::test]
async fn a_model_api_error_is_a_claude_error() {
    let mut h = Harness::start().await;
    let (permanent, error, partial) = failure(h.run("please fail [[api-error]]").await);
    assert!(permanent, "errors_are_permanent is the default");
    assert_eq!(error.code, "claude_error");
    assert!(error.message.contains("API Error: 400"), "{error:?}");
    assert!(error.message.contains("status 400"), "{error:?}");
    let partial = partial.expect("the CLI's result is kept");
    assert!(partial.session_id.is_some(), "{partial:?}");
    assert_eq!(partial.exit_code, Some(1));

    h.settings.errors_are_permanent = false;
    let (permanent, error, _) = failure(h.run("fail again [[api-error]]").await);
    assert!(!permanent && error.code == "claude_error", "{error:?}");
}

#[tokio::test]
async fn a_missing_cli_is_executor_not_found() {
    let mut h = Harness::start().await;
    for binary in [
        h.scratch()
            .join("no-such-claude")
            .to_string_lossy()
            .into_owned(),
        format!("claude-missing-{}", uuid::Uuid::new_v4().simple()),
    ] {
        h.settings.binary = binary;
        let (permanent, error, _) = failure(h.run("hello").await);
        assert!(permanent);
        assert_eq!(error.code, "executor_not_found");
        assert!(error.message.contains("CLAUDE_BIN"), "{error:?}");
        assert!(
            error.message.contains("@anthropic-ai/claude-code"),
            "{error:?}"
        );
    }
    assert_eq!(h.api.requests(), 0);
}

#[tokio::test]
async fn the_turn_limit_is_a_claude_error_that_says_so() {
    let mut h = Harness::start().await;
    h.settings.max_turns = Some(2);
    let (_, error, partial) = failure(h.run("look around [[tool-loop]]").await);
    assert_eq!(error.code, "claude_error");
    assert!(error.message.contains("error_max_turns"), "{error:?}");
    assert!(partial.and_then(|p| p.num_turns).is_some_and(|n| n >= 2));
    assert!(h.api.requests() >= 2, "the CLI used its turns");
}

#[tokio::test]
async fn allowed_tools_decide_what_the_cli_may_run() {
    let mut h = Harness::start().await;
    let denied = h
        .run("make a file [[bash:touch made-by-claude]]")
        .await
        .expect("a denied tool use still ends the run normally");
    assert!(denied.output.contains("tool result:"), "{denied:?}");
    assert!(!h.work_dir.join("made-by-claude").exists());

    h.settings.allowed_tools = vec!["Read".into(), "Bash(touch *)".into()];
    let allowed = h.run("make a file [[bash:touch made-by-claude]]").await;
    let allowed = allowed.expect("an allowed tool use");
    assert_eq!(allowed.num_turns, Some(2), "{allowed:?}");
    assert!(
        h.work_dir.join("made-by-claude").exists(),
        "the tool ran in the attempt's working directory: {allowed:?}"
    );
}

#[tokio::test]
async fn the_cli_sees_only_allowed_variables_and_no_prompt_in_its_arguments() {
    let mut h = Harness::start().await;
    let notes = h.scratch().to_path_buf();
    let real = helpers::quoted(&claudecluster_testkit::model_api::claude_cli());
    h.use_wrapper(
        "claude-spy",
        &format!(
            "env > {env}\nprintf '%s\\n' \"$@\" > {args}\nexec {real} \"$@\"",
            env = quoted(&notes.join("env.txt")),
            args = quoted(&notes.join("args.txt")),
        ),
    );
    h.settings.permission_mode = Some("acceptEdits".into());
    h.settings.max_turns = Some(3);
    let prompt = format!("secret prompt {}", uuid::Uuid::new_v4());

    let result = h.run(&prompt).await.expect("a run through the wrapper");
    assert!(result.output.contains(&answer_for(&prompt)), "{result:?}");

    let args = std::fs::read_to_string(notes.join("args.txt")).unwrap();
    assert!(!args.contains("secret prompt"), "{args}");
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(
        args,
        [
            "-p",
            "--output-format",
            "json",
            "--max-turns",
            "3",
            "--permission-mode",
            "acceptEdits"
        ]
    );

    let env = std::fs::read_to_string(notes.join("env.txt")).unwrap();
    // The shell adds a few of its own.
    let shell = ["PWD", "SHLVL", "_", "OLDPWD"];
    for line in env.lines() {
        let name = line.split_once('=').map_or(line, |(name, _)| name);
        assert!(
            h.settings.env_allowlist.iter().any(|a| a == name)
                || h.settings.env.contains_key(name)
                || name == "HOME"
                || shell.contains(&name),
            "{name} leaked into the CLI's environment"
        );
    }
    let home = format!("HOME={}", h.work_dir.join(HOME_DIR).display());
    assert!(env.lines().any(|l| l == home), "{env}");
}

/// A wrapper that starts the real CLI as its child rather than replacing
/// itself, so killing only the direct child would leave the CLI running.
fn use_forking_wrapper(h: &mut Harness) {
    let real = quoted(&claudecluster_testkit::model_api::claude_cli());
    h.use_wrapper("claude-parent", &format!("{real} \"$@\"\nexit $?"));
}

#[tokio::test]
async fn a_timeout_kills_the_cli_and_everything_it_started() {
    let mut h = Harness::start().await;
    use_forking_wrapper(&mut h);
    let ctx = h.ctx(Duration::from_secs(3));
    let outcome = ClaudeExecutor::new(&h.settings)
        .run(&task("think slowly [[slow:600000]]"), &ctx)
        .await;
    assert_eq!(outcome, Err(ExecError::TimedOut(Duration::from_secs(3))));
    if let Err(left) = wait_until_no_processes_in(&h.work_dir).await {
        panic!("processes outlived the timeout: {left:?}");
    }
}

#[tokio::test]
async fn cancelling_mid_request_kills_the_cli_and_everything_it_started() {
    let mut h = Harness::start().await;
    use_forking_wrapper(&mut h);
    let ctx = h.ctx(GENEROUS);
    let cancel = ctx.cancel.clone();
    let executor = ClaudeExecutor::new(&h.settings);
    let run = tokio::spawn(async move {
        executor
            .run(&task("wait for me [[slow:600000]]"), &ctx)
            .await
    });

    // The CLI is now waiting on the model API: the wrapper and the CLI both
    // work in the task's directory.
    h.api.wait_for_requests(1).await;
    assert!(
        processes_in(&h.work_dir).len() >= 2,
        "the wrapper and the CLI are running"
    );
    cancel.cancel();

    assert_eq!(run.await.unwrap(), Err(ExecError::Cancelled));
    if let Err(left) = wait_until_no_processes_in(&h.work_dir).await {
        panic!("processes outlived the cancellation: {left:?}");
    }
}

#[tokio::test]
async fn settings_the_cli_refuses_fail_for_good() {
    let mut h = Harness::start().await;
    h.settings.permission_mode = Some("not-a-mode".into());
    let (permanent, error, _) = failure(h.run("hello").await);
    assert!(permanent, "{error:?}");
    assert_eq!(error.code, "nonzero_exit");
    assert!(error.message.contains("not-a-mode"), "{error:?}");
    assert_eq!(h.api.requests(), 0);
}
