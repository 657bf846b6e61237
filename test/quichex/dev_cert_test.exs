defmodule Quichex.DevCertTest do
  use ExUnit.Case, async: true

  import ExUnit.CaptureIO

  doctest Quichex.DevCert

  alias Quichex.{Config, Connection, DevCert, Listener, TransportError}

  @alpn "quichex-devcert"

  # The subjectAltName extension of a DER certificate, decoded.
  defp sans(der) do
    {:OTPCertificate, tbs, _alg, _sig} = :public_key.pkix_decode_cert(der, :otp)
    extensions = elem(tbs, 10)

    Enum.find_value(extensions, fn
      {:Extension, {2, 5, 29, 17}, _critical, value} -> value
      _ -> nil
    end)
  end

  defp extension(der, oid) do
    {:OTPCertificate, tbs, _alg, _sig} = :public_key.pkix_decode_cert(der, :otp)

    Enum.find_value(elem(tbs, 10), fn
      {:Extension, ^oid, critical, value} -> {critical, value}
      _ -> nil
    end)
  end

  describe "generate/1" do
    test "a self-signed P-256 certificate for localhost, 127.0.0.1 and ::1, and its key" do
      %{cert: cert_pem, key: key_pem, der: der} = DevCert.generate()

      assert [{:Certificate, ^der, :not_encrypted}] = :public_key.pem_decode(cert_pem)
      assert [{:ECPrivateKey, _, :not_encrypted} = entry] = :public_key.pem_decode(key_pem)
      key = :public_key.pem_entry_decode(entry)

      assert Enum.sort(sans(der)) ==
               Enum.sort([
                 {:dNSName, ~c"localhost"},
                 {:iPAddress, <<127, 0, 0, 1>>},
                 {:iPAddress, <<0::15*8, 1>>}
               ])

      # Self-signed, by the key we got.
      assert :public_key.pkix_is_self_signed(der)
      {:OTPCertificate, tbs, _, _} = :public_key.pkix_decode_cert(der, :otp)
      {:OTPSubjectPublicKeyInfo, _alg, point} = elem(tbs, 7)
      assert :public_key.pkix_verify(der, {point, {:namedCurve, {1, 2, 840, 10045, 3, 1, 7}}})
      signature = :public_key.sign("msg", :sha256, key)
      assert :public_key.verify("msg", :sha256, signature, {point, elem(key, 3)})

      # A leaf for servers and clients, valid now.
      assert {true, {:BasicConstraints, false, :asn1_NOVALUE}} = extension(der, {2, 5, 29, 19})

      assert {false, [{1, 3, 6, 1, 5, 5, 7, 3, 1}, {1, 3, 6, 1, 5, 5, 7, 3, 2}]} =
               extension(der, {2, 5, 29, 37})

      {:Validity, from, to} = elem(tbs, 5)
      now = :calendar.universal_time()
      assert seconds(from) < :calendar.datetime_to_gregorian_seconds(now)

      assert seconds(to) >
               :calendar.datetime_to_gregorian_seconds(now) + 364 * 86_400

      # Two certificates never share a key or a serial number.
      other = DevCert.generate()
      assert other.key != key_pem
      {:OTPCertificate, other_tbs, _, _} = :public_key.pkix_decode_cert(other.der, :otp)
      assert elem(other_tbs, 2) != elem(tbs, 2)
    end

    test "hosts, common name and days as asked" do
      %{der: der} =
        DevCert.generate(hosts: ["myapp.test", "*.myapp.test", "10.1.2.3", "fe80::1"], days: 2)

      assert sans(der) == [
               {:dNSName, ~c"myapp.test"},
               {:dNSName, ~c"*.myapp.test"},
               {:iPAddress, <<10, 1, 2, 3>>},
               {:iPAddress, <<0xFE80::16, 0::13*8, 1>>}
             ]

      {:OTPCertificate, tbs, _, _} = :public_key.pkix_decode_cert(der, :otp)
      {:rdnSequence, rdns} = elem(tbs, 6)
      assert [{:AttributeTypeAndValue, {2, 5, 4, 3}, {:utf8String, "myapp.test"}}] in rdns

      {:Validity, _from, to} = elem(tbs, 5)
      to = seconds(to)
      now = :calendar.datetime_to_gregorian_seconds(:calendar.universal_time())
      assert to > now + 86_400 and to <= now + 2 * 86_400 + 60

      %{der: der} = DevCert.generate(hosts: ["localhost"], common_name: "Dev server")
      {:OTPCertificate, tbs, _, _} = :public_key.pkix_decode_cert(der, :otp)
      {:rdnSequence, rdns} = elem(tbs, 6)
      assert [{:AttributeTypeAndValue, {2, 5, 4, 3}, {:utf8String, "Dev server"}}] in rdns
    end

    test "bad options raise ArgumentError naming the option" do
      for {opts, option} <- [
            {[hosts: []], ":hosts"},
            {[hosts: "localhost"], ":hosts"},
            {[hosts: ["not a host"]], ":hosts"},
            {[hosts: [~c"localhost"]], ":hosts"},
            {[hosts: ["localhost", "a..b"]], ":hosts"},
            {[days: 0], ":days"},
            {[days: "30"], ":days"},
            {[common_name: ""], ":common_name"},
            {[common_name: String.duplicate("a", 65)], ":common_name"},
            {[colour: :blue], ":colour"}
          ] do
        assert_raise ArgumentError, ~r/#{option}/, fn -> DevCert.generate(opts) end
      end

      assert_raise ArgumentError, ~r/keyword list/, fn -> DevCert.generate(:nope) end
      assert_raise ArgumentError, ~r/:output/, fn -> DevCert.write!(output: "") end
      assert_raise ArgumentError, ~r/:output/, fn -> DevCert.write!(output: "dir/") end
      assert_raise ArgumentError, ~r/:output/, fn -> DevCert.write!(output: :here) end
    end
  end

  describe "write!/1 and quiche" do
    @describetag :tmp_dir

    test "the files load in a listener, and a client verifies them", %{tmp_dir: dir} do
      prefix = Path.join([dir, "nested", "dev"])
      paths = DevCert.write!(output: prefix)
      assert paths == %{cert: prefix <> ".pem", key: prefix <> "_key.pem"}
      assert {:ok, %{mode: mode}} = File.stat(paths.key)
      assert Bitwise.band(mode, 0o777) == 0o600

      {listener, port} = listen(paths)

      # verify_peer on (the client default), the certificate as the CA,
      # by name and by IP address.
      trusting = client_config(load_verify_locations_from_file: paths.cert)

      for opts <- [[host: "localhost"], [host: {127, 0, 0, 1}, server_name: "localhost"]] do
        assert {:ok, conn} = Connection.connect([port: port, config: trusting] ++ opts)
        assert :ok = Connection.wait_connected(conn, timeout: 5_000)
        {:ok, info} = Connection.info(conn)
        assert [{:Certificate, der, _}] = :public_key.pem_decode(File.read!(paths.cert))
        assert info.peer_cert == der
        :ok = Connection.close(conn)
      end

      # verify_peer off: no CA needed.
      assert {:ok, conn} =
               Connection.connect(
                 host: "localhost",
                 port: port,
                 config: client_config(verify_peer: false)
               )

      assert :ok = Connection.wait_connected(conn, timeout: 5_000)
      :ok = Connection.close(conn)

      # The check is real: a name the certificate does not carry, and
      # another development certificate as the CA, are both refused.
      assert {:ok, conn} =
               Connection.connect(
                 host: {127, 0, 0, 1},
                 server_name: "example.com",
                 port: port,
                 config: trusting
               )

      assert {:error, %TransportError{reason: {:transport, 0x12A, _}}} =
               Connection.wait_connected(conn, timeout: 5_000)

      other = DevCert.write!(output: Path.join(dir, "other"))

      assert {:ok, conn} =
               Connection.connect(
                 host: "localhost",
                 port: port,
                 config: client_config(load_verify_locations_from_file: other.cert)
               )

      assert {:error, %TransportError{reason: {:transport, 0x130, _}}} =
               Connection.wait_connected(conn, timeout: 5_000)

      :ok = Listener.stop(listener)
    end

    test "the certificate is valid for ::1", %{tmp_dir: dir} do
      paths = DevCert.write!(output: Path.join(dir, "dev"))
      {listener, port} = listen(paths, {0, 0, 0, 0, 0, 0, 0, 1})
      trusting = client_config(load_verify_locations_from_file: paths.cert)

      assert {:ok, conn} =
               Connection.connect(
                 host: "::1",
                 server_name: "localhost",
                 port: port,
                 config: trusting
               )

      assert :ok = Connection.wait_connected(conn, timeout: 5_000)
      :ok = Connection.close(conn)
      :ok = Listener.stop(listener)
    end
  end

  describe "mix quichex.gen.cert" do
    @describetag :tmp_dir

    test "writes the certificate and key, asks before overwriting", %{tmp_dir: dir} do
      prefix = Path.join(dir, "selfsigned")

      run = fn args, input ->
        capture_io(input, fn -> Mix.Tasks.Quichex.Gen.Cert.run(args) end)
      end

      out = run.(["--output", prefix, "--days", "10"], "")
      assert out =~ "* creating #{Path.relative_to_cwd(prefix)}.pem"
      assert out =~ "* creating #{Path.relative_to_cwd(prefix)}_key.pem"
      assert out =~ "load_verify_locations_from_file: #{inspect(prefix <> ".pem")}"
      cert = File.read!(prefix <> ".pem")
      [{:Certificate, der, _}] = :public_key.pem_decode(cert)
      assert {:dNSName, ~c"localhost"} in sans(der)
      assert Bitwise.band(File.stat!(prefix <> "_key.pem").mode, 0o777) == 0o600

      # Existing files: "no" leaves them, --force replaces them.
      out = run.(["-o", prefix], "n\n")
      assert out =~ "already exist. Overwrite?"
      assert out =~ "Nothing written."
      assert File.read!(prefix <> ".pem") == cert

      run.(["-o", prefix, "--force", "myapp.test", "127.0.0.2"], "")
      [{:Certificate, der, _}] = :public_key.pem_decode(File.read!(prefix <> ".pem"))
      assert sans(der) == [{:dNSName, ~c"myapp.test"}, {:iPAddress, <<127, 0, 0, 2>>}]
    end

    test "bad arguments raise Mix.Error naming them", %{tmp_dir: dir} do
      prefix = Path.join(dir, "x")

      for {args, message} <- [
            {["--days", "soon"], ~r/--days/},
            {["--days", "0", "-o", prefix], ~r/:days/},
            {["--output", prefix <> "/"], ~r/:output/},
            {["--colour", "blue"], ~r/--colour/},
            {["-o", prefix, "bad host"], ~r/:hosts/}
          ] do
        assert_raise Mix.Error, message, fn -> Mix.Tasks.Quichex.Gen.Cert.run(args) end
      end

      refute File.exists?(prefix <> ".pem")
    end
  end

  defp listen(paths, ip \\ {127, 0, 0, 1}) do
    config =
      Config.new(
        application_protos: [@alpn],
        load_cert_chain_from_pem_file: paths.cert,
        load_priv_key_from_pem_file: paths.key
      )

    {:ok, listener} = Listener.start_link(ip: ip, port: 0, config: config, active: true)
    {:ok, {_ip, port}} = Listener.sockname(listener)
    {listener, port}
  end

  # UTCTime ('YYMMDDHHMMSSZ', 1950-2049) to Gregorian seconds.
  defp seconds({:utcTime, [y1, y2 | rest]}) do
    year = List.to_integer([y1, y2])

    seconds(
      {:generalTime,
       Integer.to_charlist(if year < 50, do: 2000 + year, else: 1900 + year) ++ rest}
    )
  end

  defp seconds({:generalTime, time}) do
    <<y::binary-4, mo::binary-2, d::binary-2, h::binary-2, mi::binary-2, s::binary-2, "Z">> =
      List.to_string(time)

    [y, mo, d, h, mi, s] = Enum.map([y, mo, d, h, mi, s], &String.to_integer/1)
    :calendar.datetime_to_gregorian_seconds({{y, mo, d}, {h, mi, s}})
  end

  defp client_config(opts), do: Config.new([application_protos: [@alpn]] ++ opts)
end
