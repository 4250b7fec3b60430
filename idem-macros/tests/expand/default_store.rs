// No `store`: the process default store (a call fails with NoStore when none is set).
#[idempotent(key = job_id, on_conflict = reject)]
async fn run_job<'a>(job_id: &'a str, payload: &'a [u8]) -> std::io::Result<usize> {
    Ok(payload.len())
}
