# The soak and abuse suite (issue 15): QUICHEX_SOAK=full (`make soak`) runs
# the full sizes, anything else a short form (`make test`). Shares
# test/support with the unit tests; certificates are made once per run.
unless :persistent_term.get(:quichex_test_certs, nil) do
  dir = Path.join(System.tmp_dir!(), "quichex-test-certs-#{System.os_time()}")
  :persistent_term.put(:quichex_test_certs, Quichex.Test.Certs.generate!(dir))
  System.at_exit(fn _ -> File.rm_rf(dir) end)
end

ExUnit.start(assert_receive_timeout: 2_000)
