defmodule Quichex.Test.Helpers do
  @moduledoc false
  # Configs, listeners and clients on loopback for tests.

  import ExUnit.Assertions

  @alpn "quichex-test"

  def certs, do: :persistent_term.get(:quichex_test_certs)
  def alpn, do: @alpn

  def server_config(opts \\ []) do
    c = certs()

    Quichex.Config.new(
      Keyword.merge(
        [
          application_protos: [@alpn],
          load_cert_chain_from_pem_file: c.cert,
          load_priv_key_from_pem_file: c.key
        ],
        opts
      )
    )
  end

  def client_config(opts \\ []) do
    Quichex.Config.new(
      Keyword.merge(
        [application_protos: [@alpn], load_verify_locations_from_file: certs().ca],
        opts
      )
    )
  end

  def start_listener(opts \\ []) do
    {config_opts, opts} = Keyword.pop(opts, :config_opts, [])
    opts = Keyword.merge([ip: {127, 0, 0, 1}, port: 0, config: server_config(config_opts)], opts)
    {:ok, listener} = Quichex.Listener.start_link(opts)
    {:ok, {_ip, port}} = Quichex.Listener.sockname(listener)
    {listener, port}
  end

  def connect!(port, opts \\ []) do
    {config_opts, opts} = Keyword.pop(opts, :config_opts, [])

    opts =
      Keyword.merge([host: "localhost", port: port, config: client_config(config_opts)], opts)

    {:ok, conn} = Quichex.Connection.connect(opts)
    :ok = Quichex.Connection.wait_connected(conn, timeout: 5_000)
    conn
  end

  # Accepts one server-side connection in active mode.
  def accept!(listener, timeout \\ 5_000) do
    receive do
      {:quic_connection, ^listener, conn, _peer} -> conn
    after
      timeout -> flunk("no connection accepted within #{timeout} ms")
    end
  end

  # PropEr's forall, with exceptions turned into a failed case that says
  # why (Debian's PropEr 1.2 cannot report exceptions itself on OTP 25).
  def forall(generator, fun) do
    :proper.forall(generator, fn value ->
      try do
        fun.(value)
      rescue
        error ->
          IO.puts("property raised: " <> Exception.format(:error, error, __STACKTRACE__))
          false
      catch
        kind, reason ->
          IO.puts("property raised: " <> Exception.format(kind, reason, __STACKTRACE__))
          false
      end
    end)
  end

  # Runs a PropEr property and fails the test with its counterexample.
  def proper!(property, numtests) do
    result =
      :proper.quickcheck(property, [
        :quiet,
        {:numtests, numtests},
        {:on_output, fn _, _ -> :ok end}
      ])

    unless result == true do
      flunk("property failed: #{inspect(:proper.counterexample(), limit: 20)}")
    end
  end

  # Waits until fun returns a truthy value or the time runs out.
  def eventually(fun, timeout \\ 5_000, step \\ 20) do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_eventually(fun, deadline, step)
  end

  defp do_eventually(fun, deadline, step) do
    case fun.() do
      result when result not in [nil, false] ->
        result

      _ ->
        if System.monotonic_time(:millisecond) > deadline do
          flunk("condition not met in time")
        else
          Process.sleep(step)
          do_eventually(fun, deadline, step)
        end
    end
  end

  def random_bytes(n), do: :crypto.strong_rand_bytes(n)

  @doc """
  A real client's first flight (its Initial datagrams, each at least 1200
  bytes) for a server at `peer`, as if sent from `local`; the client is
  dropped, so nobody ever answers the server.
  """
  def first_flight(peer \\ {{127, 0, 0, 1}, 4433}, local \\ {{127, 0, 0, 1}, 40_000}) do
    {:ok, config} = Quichex.Config.build(client_config(), :client)
    first_flight(config, peer, local)
  end

  @doc "`count` first flights (see `first_flight/2`), made on every scheduler."
  def first_flights(count, peer) do
    {:ok, config} = Quichex.Config.build(client_config(), :client)
    local = {{127, 0, 0, 1}, 40_000}

    1..count
    |> Task.async_stream(fn _ -> first_flight(config, peer, local) end,
      ordered: false,
      timeout: 60_000
    )
    |> Enum.map(fn {:ok, flight} -> flight end)
  end

  defp first_flight(config, peer, local) do
    scid = :crypto.strong_rand_bytes(16)

    {:ok, conn} =
      Quichex.Native.connection_connect(config, "localhost", scid, local, peer, 1, nil)

    {:ok, %{batches: batches}} = Quichex.Native.connection_flush(conn, [], [], 16)

    for {_from, _to, data, seg, _delay} <- batches,
        chunk <- chunks(data, seg),
        do: chunk
  end

  defp chunks(data, seg) when byte_size(data) > seg do
    <<chunk::binary-size(seg), rest::binary>> = data
    [chunk | chunks(rest, seg)]
  end

  defp chunks(data, _seg), do: [data]
end
