//! The backend contract: how every broker and result store must behave,
//! written once against the traits and run against each backend.
//!
//! Each case is an `async fn(&Backends)` in [`broker`] or [`store`]; the
//! [`contract!`] macro turns every (case, backend) pair into a `#[tokio::test]`
//! that gets a fresh, uniquely named [`harness::Fixture`] and cleans it up.
//! Adding a backend is one more arm in the macro invocation at the bottom.
//! [`networked`] holds the checks that only make sense for NATS and Redis
//! (stream setup, TTLs on keys, error mapping).

mod broker;
mod harness;
mod networked;
mod proxy;
mod store;

/// Every contract case, handed to `$callback!` after the callback's own
/// arguments, so the list is written once for all backends.
macro_rules! with_cases {
    ($callback:ident!($($args:tt)*)) => {
        $callback!(
            $($args)*;
            broker::publish_consume_ack_round_trip,
            broker::high_priority_overtakes_a_low_backlog,
            broker::nak_with_delay_redelivers,
            broker::progress_keeps_the_lease,
            broker::unacked_message_comes_back_after_the_lease,
            broker::term_is_final,
            broker::duplicate_publish_is_stored_once,
            broker::batch_publish_delivers_everything_once,
            broker::next_batch_never_exceeds_max,
            broker::idle_consumer_wakes_for_a_new_task,
            broker::dead_letters_list_get_delete,
            store::create_and_get,
            store::idempotency_key_returns_the_first_task,
            store::create_many_mixes_new_and_existing,
            store::attempts_move_through_retry_to_success,
            store::end_after_final_counts_a_duplicate,
            store::unstarted_attempts_are_recorded_whole,
            store::an_unstarted_attempt_of_a_cancelled_task_is_closed_as_cancelled,
            store::an_unstarted_attempt_sent_again_is_recorded_once,
            store::start_attempt_creates_a_missing_record,
            store::cancel_only_moves_unfinished_tasks,
            store::remove_releases_the_idempotency_key,
            store::list_pages_newest_first_with_state_filter,
            store::list_pages_through_identical_timestamps,
            store::list_filters_many_tasks_by_state,
            store::reopen_clears_the_outcome_and_keeps_history,
            store::workers_expire_and_can_be_removed,
            store::health_answers,
        );
    };
}

/// One `#[tokio::test]` per case for one backend, in a module named after
/// the backend, each on a fresh fixture from `$fixture`.
macro_rules! contract {
    ($backend:ident => $fixture:path; $($module:ident :: $case:ident),+ $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let fixture = $fixture().await;
                    crate::$module::$case(&fixture.backends).await;
                    fixture.cleanup().await;
                }
            )+
        }
    };
}

with_cases!(contract!(jetstream_redis => crate::harness::Fixture::networked));
with_cases!(contract!(embedded => crate::harness::Fixture::embedded));
