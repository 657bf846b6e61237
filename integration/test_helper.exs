# Integration tests: interop with other QUIC stacks and fault injection.
# Shares test/support with the unit tests; certificates are made once per run.
unless :persistent_term.get(:quichex_test_certs, nil) do
  dir = Path.join(System.tmp_dir!(), "quichex-test-certs-#{System.os_time()}")
  :persistent_term.put(:quichex_test_certs, Quichex.Test.Certs.generate!(dir))
  System.at_exit(fn _ -> File.rm_rf(dir) end)
end

ExUnit.configure(formatters: [ExUnit.CLIFormatter, Quichex.Test.MatrixFormatter])
ExUnit.start(timeout: 300_000, assert_receive_timeout: 2_000)
