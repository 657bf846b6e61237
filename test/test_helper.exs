dir = Path.join(System.tmp_dir!(), "quichex-test-certs-#{System.os_time()}")
certs = Quichex.Test.Certs.generate!(dir)
:persistent_term.put(:quichex_test_certs, certs)
System.at_exit(fn _ -> File.rm_rf(dir) end)

# assert_receive waits up to 2 s by default (ExUnit's 100 ms is too tight on
# a busy machine); it returns as soon as the message is there.
ExUnit.start(timeout: 120_000, assert_receive_timeout: 2_000)
