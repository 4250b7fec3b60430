async fn run_job<'a>(job_id: &'a str, payload: &'a [u8]) -> std::io::Result<usize> {
    let __idem_ok = ::idem_core::__private::ok_type::<usize>().storable();
    let __idem_call = ::idem_core::__private::call(::idem_core::__private::site!())
        .key(&(job_id))
        .fingerprint((
            ::idem_core::__private::arg(&job_id).checked(),
            ::idem_core::__private::arg(&payload).checked(),
        ))
        .on_conflict(::idem_core::__private::OnConflict::Reject);
    __idem_ok
        .run_on_default::<
            _,
            _,
        >(
            __idem_call,
            ::idem_core::__private::from_error::<_>,
            async {
                #[allow(unused_variables)]
                let job_id = job_id;
                #[allow(unused_variables)]
                let payload = payload;
                Ok(payload.len())
            },
        )
        .await
}
