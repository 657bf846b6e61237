dir = Path.join(System.tmp_dir!(), "quichex-test-certs-#{System.os_time()}")
certs = Quichex.Test.Certs.generate!(dir)
:persistent_term.put(:quichex_test_certs, certs)
System.at_exit(fn _ -> File.rm_rf(dir) end)

ExUnit.start(timeout: 120_000)
